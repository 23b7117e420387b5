"""`mtlrec plan`: TorchRec's sharding planner as a dry run, on this CPU-only machine."""

import argparse
import time
from pathlib import Path

import pytest

from mtlrec.config import load_config
from mtlrec.plan import (
    PlanError,
    add_plan_arguments,
    cli_plan,
    parse_pooling_factors,
    plan,
    table_specs,
)

try:
    import torchrec.distributed.planner  # noqa: F401

    TORCHREC = None
except Exception as err:  # ImportError, or a broken fbgemm build
    TORCHREC = f"TorchRec is not importable ({err})"

needs_torchrec = pytest.mark.skipif(TORCHREC is not None, reason=TORCHREC or "")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def small(train=None, **sparse_overrides):
    """A config with a user table, an item table read by item and a list of seen items, and a
    hashed category table; `train` and `sparse_overrides` (per feature) change its fields."""
    sparse = [
        {"name": "user", "vocab_size": 5000, "embedding_dim": 16},
        {"name": "item", "vocab_size": 2000, "embedding_dim": 16},
        {"name": "seen", "embedding": "item", "vocab_size": 2000, "embedding_dim": 16, "multi_valued": True,
         "max_length": 20},
        {"name": "category", "hash_buckets": 99, "embedding_dim": 8},
    ]
    for f in sparse:
        f.update(sparse_overrides.get(f["name"], {}))
    return load_config({"name": "small", "data": {"source": "files", "train": "unused.parquet"},
                        "features": {"sparse": sparse, "dense": [{"name": "x"}]},
                        "tasks": [{"name": "click"}], "train": {"batch_size": 1024, **(train or {})}})


def covered_cells(table_plan) -> int:
    return sum(s.rows * s.cols for s in table_plan.shards)


def test_tables_from_the_schema():
    specs = {s.name: s for s in table_specs(small().schema)}
    assert list(specs) == ["user", "item", "category"]
    assert (specs["user"].rows, specs["user"].dim) == (5000, 16)
    assert specs["category"].rows == 100  # hash_buckets + the missing id 0, as the encoder sizes it
    item = specs["item"]
    assert item.features == ("item", "seen")
    assert item.pooling_factors == (1.0, 20.0)
    assert item.pooling_sources == ("single id", "max_length (upper bound)")
    given = {s.name: s for s in table_specs(small().schema, {"seen": 7.5})}["item"]
    assert given.pooling_factors == (1.0, 7.5) and given.pooling_sources[1] == "given"


def test_missing_table_sizes_name_the_features():
    config = small(user={"vocab_size": None}, category={"hash_buckets": None})
    with pytest.raises(PlanError) as err:
        plan(config, world_size=2)
    message = str(err.value)
    assert "['user', 'category']" in message and "vocab_size or hash_buckets" in message
    assert "'item'" not in message


def test_lists_need_a_pooling_factor_and_bad_ones_are_refused():
    config = small(seen={"max_length": None})
    with pytest.raises(PlanError, match=r"lists without a pooling factor .*\['seen'\]"):
        table_specs(config.schema)
    assert table_specs(config.schema, {"seen": 12})[1].pooling_factors == (1.0, 12.0)
    with pytest.raises(PlanError, match="unknown sparse feature"):
        table_specs(config.schema, {"nope": 3})
    with pytest.raises(PlanError, match=r"hold one id per row"):
        table_specs(config.schema, {"seen": 3, "user": 2})
    with pytest.raises(PlanError, match="positive"):
        table_specs(config.schema, {"seen": 0})
    assert parse_pooling_factors(["seen=3", "other=0.5"]) == {"seen": 3.0, "other": 0.5}
    for bad in ("seen", "seen=x", "=3"):
        with pytest.raises(PlanError, match="NAME=NUMBER"):
            parse_pooling_factors([bad])


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(PlanError) as err:
        plan(small(), world_size=0, device="tpu", sharding="diagonal")
    message = str(err.value)
    assert "world size" in message and "'tpu'" in message and "'diagonal'" in message
    assert issubclass(PlanError, ValueError)  # the CLI prints ValueErrors as one error line, exit 2


@needs_torchrec
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_small_config_plans_in_seconds(world_size):
    start = time.perf_counter()
    report = plan(small(), world_size=world_size, device="cuda", hbm_gb=1)
    assert time.perf_counter() - start < 60
    assert [t.table.name for t in report.tables] == ["user", "item", "category"]
    assert report.batch_per_rank == 1024 // world_size
    for t in report.tables:
        assert t.ranks and all(0 <= r < world_size for r in t.ranks)
        assert sorted({s.rank for s in t.shards}) == sorted(set(t.ranks))
        copies = len(t.shards) if t.sharding_type == "data_parallel" else 1
        assert covered_cells(t) == copies * t.table.rows * t.table.dim
    assert len(report.ranks) == world_size
    assert all(u.hbm_bytes <= report.usable_hbm_bytes for u in report.ranks)
    assert report.step_ms == pytest.approx(max(u.step.total for u in report.ranks)) and report.step_ms > 0
    assert report.sum_of_maxima_ms >= report.step_ms - 1e-12
    text = report.markdown()
    for name in ("user", "item", "category", "seen (20, max_length (upper bound))"):
        assert name in text
    assert f"{report.step_ms:.3f} ms on the slowest rank" in text


@needs_torchrec
def test_table_wise_puts_each_table_whole_on_one_rank():
    report = plan(small(), world_size=4, device="cuda", hbm_gb=1, sharding="table_wise")
    for t in report.tables:
        assert t.sharding_type == "table_wise" and len(t.ranks) == 1
        (shard,) = t.shards
        assert (shard.row_offset, shard.rows, shard.col_offset, shard.cols) == (0, t.table.rows, 0, t.table.dim)
        assert t.table.name in report.ranks[shard.rank].tables


@needs_torchrec
def test_row_wise_splits_a_tables_rows_over_ranks():
    report = plan(small(), world_size=4, device="cuda", hbm_gb=1, sharding="row_wise")
    for t in report.tables:
        assert t.sharding_type == "row_wise"
        shards = sorted(t.shards, key=lambda s: s.row_offset)
        assert len({s.rank for s in shards}) == len(shards) > 1
        assert sum(s.rows for s in shards) == t.table.rows
        assert [s.row_offset for s in shards] == [sum(p.rows for p in shards[:i]) for i in range(len(shards))]
        assert all((s.col_offset, s.cols) == (0, t.table.dim) for s in shards)


@needs_torchrec
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_per_rank_memory_adds_up_to_the_tables_plus_optimizer_state(sharding):
    config = small()
    tables_bytes = sum(s.weight_bytes for s in table_specs(config.schema))
    rows = sum(s.rows for s in table_specs(config.schema))
    hbm = {}
    for optimizer in ("sgd", "adagrad", "adam", "rowwise_adagrad"):
        report = plan(config, world_size=4, device="cuda", hbm_gb=1, sharding=sharding, optimizer=optimizer)
        assert sum(u.weight_bytes for u in report.ranks) == tables_bytes
        assert sum(u.hbm_bytes for u in report.ranks) == sum(s.hbm_bytes for t in report.tables for s in t.shards)
        assert all(u.hbm_bytes >= u.weight_bytes for u in report.ranks)
        hbm[optimizer] = sum(u.hbm_bytes for u in report.ranks)
    # the planner counts weights + input/output buffers (SGD: no state) + the optimizer's state
    assert hbm["adagrad"] - hbm["sgd"] == tables_bytes  # one accumulator per weight
    assert hbm["adam"] - hbm["sgd"] == 2 * tables_bytes  # two moments per weight
    assert hbm["rowwise_adagrad"] - hbm["sgd"] == 4 * rows  # one float per row


@needs_torchrec
def test_the_configs_embedding_optimizer_is_the_one_counted():
    groups = [{"params": "embedding", "optimizer": "adagrad"}, {"params": "rest", "optimizer": "adam"}]
    assert plan(small(train={"optimizers": groups}), world_size=2, hbm_gb=1).optimizer == "adagrad"
    assert plan(small(train={"optimizer": "sgd"}), world_size=2, hbm_gb=1).optimizer == "sgd"
    assert plan(small(), world_size=2, hbm_gb=1).optimizer == "adam"  # train.optimizer's default


@needs_torchrec
def test_pooling_factors_reach_the_planner():
    def item_cost(factor):
        report = plan(small(), world_size=2, device="cuda", hbm_gb=1, sharding="table_wise",
                      pooling_factors={"seen": factor})
        (item,) = [t for t in report.tables if t.table.name == "item"]
        return item.shards[0].step.fwd_compute, item.shards[0].hbm_bytes

    few, many = item_cost(1), item_cost(50)
    assert many[0] > few[0] and many[1] > few[1]  # more ids: more lookups and larger input buffers


@needs_torchrec
def test_impossible_plan_is_a_clear_error():
    config = small(user={"vocab_size": 10_000_000, "embedding_dim": 64})  # 2.4 GiB of weights
    with pytest.raises(PlanError) as err:
        plan(config, world_size=2, device="cuda", hbm_gb=1, ddr_gb=0)
    message = str(err.value)
    assert message.startswith("no plan fits") and "'user'" in message and "2.4 GiB" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    # the same tables fit once the devices can hold them (here: 8 x 870 MiB, no optimizer state)
    assert plan(config, world_size=8, device="cuda", hbm_gb=1, ddr_gb=0, optimizer="sgd").tables


@needs_torchrec
def test_cli_handler_prints_the_plan(tmp_path, capsys):
    import yaml

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small().to_dict()))
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args([str(path), "--world-size", "2", "--hbm-gb", "1", "--sharding", "row_wise",
                              "--pooling-factor", "seen=4", "--set", "train.batch_size=64"])
    assert cli_plan(args) == 0
    out = capsys.readouterr().out
    assert "batch 32 per rank (global 64)" in out and "seen (4, given)" in out
    assert out.count("| row_wise | fused |") == 3


@needs_torchrec
def test_internet_scale_config_fits_64_gpus_of_80_gb():
    config = load_config(CONFIGS / "plan_internet_scale.yaml")
    specs = {s.name: s for s in table_specs(config.schema)}
    assert specs["user_id"].rows == 1_000_000_000 and specs["item_id"].rows == 100_000_000
    assert specs["item_id"].features == ("item_id", "history")
    report = plan(config, world_size=64, device="cuda", hbm_gb=80)
    assert all(u.hbm_bytes <= report.usable_hbm_bytes for u in report.ranks)
    big = [t for t in report.tables if t.table.name in ("user_id", "item_id")]
    assert all(len(t.ranks) > 1 for t in big)  # neither fits one GPU
    for t in big:
        assert covered_cells(t) == t.table.rows * t.table.dim
