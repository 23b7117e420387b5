"""The TorchRec embedding (`mtlrec.nn.torchrec_embedding`) against the plain `FeatureEmbedding`:
equal outputs and table gradients, `keyed()` round trips, weight copies both ways, the fused
kernel's SGD step, and the errors. Skipped where TorchRec does not import."""

import doctest
import subprocess
import sys

import pytest
import torch

from mtlrec.data.features import Features, Jagged
from mtlrec.nn.embedding import FeatureEmbedding
from mtlrec.nn.torchrec_embedding import plain_layout, torchrec_available
from mtlrec.schema import Schema

needs_torchrec = pytest.mark.skipif(
    not torchrec_available(),
    reason="TorchRec is not importable: pip install 'mtlrec[torchrec]', then pip install --no-deps torchrec==1.8.0",
)

BAGS = [  # two sizes; "item" read by a single id, a sum list and a weighted mean list; "tags" by two lists
    {"name": "user", "vocab_size": 30, "embedding_dim": 8},
    {"name": "item", "vocab_size": 40, "embedding_dim": 4},
    {"name": "city", "vocab_size": 5, "embedding_dim": 4},
    {"name": "clicked", "embedding": "item", "vocab_size": 40, "embedding_dim": 4, "multi_valued": True,
     "pooling": "sum"},
    {"name": "viewed", "embedding": "item", "vocab_size": 40, "embedding_dim": 4, "multi_valued": True,
     "pooling": "mean", "weights": "viewed_seconds"},
    {"name": "tags", "vocab_size": 12, "embedding_dim": 8, "multi_valued": True, "pooling": "mean"},
    {"name": "scored", "embedding": "tags", "vocab_size": 12, "embedding_dim": 8, "multi_valued": True,
     "pooling": "sum", "weights": "scores"},
]
UNPOOLED = [  # max and attention: "movie" read by its target, an attention list and a weighted mean list
    {"name": "movie", "vocab_size": 25, "embedding_dim": 4},
    {"name": "history", "embedding": "movie", "vocab_size": 25, "embedding_dim": 4, "multi_valued": True,
     "pooling": "attention", "max_length": 6, "attention": {"target": "movie", "hidden": [8]}},
    {"name": "rated", "embedding": "movie", "vocab_size": 25, "embedding_dim": 4, "multi_valued": True,
     "pooling": "mean", "weights": "ratings"},
    {"name": "genres", "vocab_size": 7, "embedding_dim": 8, "multi_valued": True, "pooling": "max"},
]
SCHEMAS = {"bags": BAGS, "bags+max+attention": BAGS + UNPOOLED}


def make_schema(sparse, dense=2) -> Schema:
    return Schema(sparse=sparse, dense=[{"name": f"x{i}"} for i in range(dense)], tasks=[{"name": "click"}])


def make_batch(schema: Schema, rows: int = 64, seed: int = 0) -> Features:
    """Random ids, lists of 0..max_length (6 unless set) elements with a quarter of them empty, and
    positive element weights where the schema gives weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(f.vocab_size, (rows,), generator=g) for f in schema.singles], 1)
    lists = []
    for f in schema.lists:
        lengths = torch.randint(1, (f.max_length or 6) + 1, (rows,), generator=g)
        lengths[torch.rand(rows, generator=g) < 0.25] = 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        total = int(offsets[-1])
        weights = torch.rand(total, generator=g) + 0.1 if f.weights else None
        lists.append(Jagged(torch.randint(f.vocab_size, (total,), generator=g), offsets, weights))
    return Features(ids, torch.randn(rows, len(schema.dense), generator=g), tuple(lists))


def twins(schema: Schema, **options):
    """A FeatureEmbedding and a TorchRecEmbedding holding the same weights."""
    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

    torch.manual_seed(0)
    plain = FeatureEmbedding(schema)
    for table in plain.tables:  # rows far apart, so a mix-up of tables or rows shows
        torch.nn.init.normal_(table.weight)
    torchrec = TorchRecEmbedding(schema, **options)
    torchrec.load_from(plain)
    return plain, torchrec


@needs_torchrec
@pytest.mark.parametrize("weighted", [None, True])
def test_keyed_round_trips(weighted):
    from mtlrec.nn.torchrec_embedding import keyed

    schema = make_schema(BAGS + UNPOOLED)
    batch = make_batch(schema)
    kjt = keyed(batch, schema, weighted=weighted)
    assert kjt.keys() == [f.name for f in schema.singles] + [f.name for f in schema.lists]
    assert kjt.stride() == 64
    parts = kjt.to_dict()
    for j, f in enumerate(schema.singles):
        assert torch.equal(parts[f.name].values(), batch.ids[:, j])
        assert torch.equal(parts[f.name].lengths(), torch.ones(64, dtype=torch.long))
    for f, lists in zip(schema.lists, batch.lists):
        assert torch.equal(parts[f.name].values(), lists.values)
        assert torch.equal(parts[f.name].lengths(), lists.lengths)
        assert torch.equal(parts[f.name].offsets(), lists.offsets)
        expected = lists.weights if lists.weights is not None else torch.ones(lists.values.shape[0])
        assert torch.equal(parts[f.name].weights(), expected)  # the batch has weights, so None means "give them"


@needs_torchrec
def test_keyed_leaves_out_weights_no_list_carries():
    from mtlrec.nn.torchrec_embedding import keyed

    schema = make_schema(BAGS[:4])
    batch = make_batch(schema)
    assert keyed(batch, schema).weights_or_none() is None
    assert torch.equal(keyed(batch, schema, weighted=True).weights(), torch.ones(64 * 3 + batch.lists[0].values.shape[0]))
    with pytest.raises(ValueError, match="3 single-id columns and 0 lists"):
        keyed(batch._replace(lists=()), schema)


@needs_torchrec
@pytest.mark.parametrize("name", SCHEMAS)
def test_outputs_and_table_gradients_equal_the_plain_path(name):
    schema = make_schema(SCHEMAS[name])
    plain, torchrec = twins(schema)
    batch = make_batch(schema)
    assert any(len(j) and (j.lengths == 0).any() for j in batch.lists)  # empty lists are in the batch
    expected, got = plain(batch), torchrec(batch)
    assert got.shape == expected.shape == (64, plain.out_dim) and torchrec.out_dim == plain.out_dim
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    weights = torchrec.table_weights()
    assert sorted(weights) == sorted(schema.tables)
    for table, (i, rows) in plain_layout(plain, schema).items():
        plain_grad = plain.tables[i].weight.grad[rows]
        assert plain_grad.abs().sum() > 0, table
        torch.testing.assert_close(weights[table].grad, plain_grad, atol=1e-6, rtol=0, msg=table)
    for (name_, mine), theirs in zip(torchrec.attention.named_parameters(), plain.attention.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=0, msg=name_)


@needs_torchrec
def test_a_shared_table_is_one_parameter():
    schema = make_schema(SCHEMAS["bags+max+attention"])
    _, torchrec = twins(schema)
    tables = torchrec.table_weights()
    names = [n for n, _ in torchrec.named_parameters() if not n.startswith("attention.")]
    assert len(names) == len(schema.tables) == len(tables)
    assert tables["item"].shape == (40, 4) and tables["tags"].shape == (12, 8) and tables["movie"].shape == (25, 4)


@needs_torchrec
def test_copy_to_gives_the_plain_path_the_same_outputs():
    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

    schema = make_schema(SCHEMAS["bags+max+attention"])
    torch.manual_seed(1)
    torchrec = TorchRecEmbedding(schema)
    for weight in torchrec.table_weights().values():
        torch.nn.init.normal_(weight.data)
    plain = FeatureEmbedding(schema)
    torchrec.copy_to(plain)
    batch = make_batch(schema, seed=3)
    torch.testing.assert_close(plain(batch), torchrec(batch), atol=1e-6, rtol=0)


@needs_torchrec
@pytest.mark.parametrize("optimizer, options", [(torch.optim.SGD, {"lr": 0.5}),
                                                (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-10})])
def test_fused_kernel_takes_the_steps_of_the_plain_path(optimizer, options):
    """fbgemm's kernel updates the tables in backward as torch's optimizer does on the plain path's
    dense gradients (Adagrad: 3 steps, so its accumulated state counts too)."""
    schema = make_schema(BAGS)
    plain, fused = twins(schema, fused_optimizer=(optimizer, options))
    assert type(fused.pooled).__name__ == "FusedEmbeddingBagCollection"
    step = optimizer(plain.parameters(), **options)
    for seed in range(1 if optimizer is torch.optim.SGD else 3):
        batch = make_batch(schema, seed=5 + seed)
        expected, got = plain(batch), fused(batch)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        upstream = torch.randn_like(expected)
        (expected * upstream).sum().backward()
        (got * upstream).sum().backward()  # the fused kernel updates its tables here
        step.step()
        step.zero_grad()
    weights = fused.table_weights()
    for table, (i, rows) in plain_layout(plain, schema).items():
        assert weights[table].grad is None
        torch.testing.assert_close(weights[table], plain.tables[i].weight[rows], atol=1e-6, rtol=0, msg=table)


@needs_torchrec
def test_distributed_model_parallel_shards_it_unchanged():
    """One process: DistributedModelParallel swaps the bag collection for its sharded one (table-wise,
    fbgemm's fused kernel, SGD applied in backward); outputs and the step equal the plain path's."""
    import socket

    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel, planner
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    schema = make_schema(BAGS)
    plain, torchrec = twins(schema)
    apply_optimizer_in_backward(torch.optim.SGD, torchrec.pooled.parameters(), {"lr": 0.5})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        constraints = {t: planner.ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                       for t in schema.tables}
        plan = planner.EmbeddingShardingPlanner(topology=planner.Topology(world_size=1, compute_device="cpu"),
                                                constraints=constraints).collective_plan(torchrec, pg=dist.GroupMember.WORLD)
        sharded = DistributedModelParallel(torchrec, device=torch.device("cpu"), plan=plan, init_data_parallel=False)
        assert type(sharded.module.pooled).__name__ == "ShardedEmbeddingBagCollection"
        state = sharded.module.pooled.state_dict()
        tables = {name: state[f"embedding_bags.{name}.weight"].local_shards()[0].tensor for name in schema.tables}
        layout = plain_layout(plain, schema)
        with torch.no_grad():  # sharding draws the tables afresh (from the configs' init_fn): copy them again
            for name, (i, rows) in layout.items():
                tables[name].copy_(plain.tables[i].weight[rows])
        batch = make_batch(schema, seed=7)
        expected, got = plain(batch), sharded(batch)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        upstream = torch.randn_like(expected)
        (expected * upstream).sum().backward()
        (got * upstream).sum().backward()
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        for table in plain.tables:
            table.weight -= 0.5 * table.weight.grad
    for name, (i, rows) in layout.items():
        torch.testing.assert_close(tables[name], plain.tables[i].weight[rows], atol=1e-6, rtol=0, msg=name)


@needs_torchrec
def test_zero_weight_rows_pool_to_zero_with_finite_gradients():
    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

    schema = make_schema(BAGS)
    torchrec = TorchRecEmbedding(schema)
    batch = make_batch(schema, rows=4)
    viewed = Jagged(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 2, 3, 3]), torch.tensor([0.0, 0.0, 2.0]))
    batch = batch._replace(lists=(batch.lists[0], viewed, *batch.lists[2:]))
    out = torchrec(batch)
    start = 8 + 4 + 4 + 4  # user, item, city, clicked
    assert torch.equal(out[:2, start : start + 4], torch.zeros(2, 4))
    torch.testing.assert_close(out[2, start : start + 4], torchrec.table_weights()["item"][3].detach())
    out.sum().backward()
    assert torch.isfinite(torchrec.table_weights()["item"].grad).all()


@needs_torchrec
def test_clear_errors():
    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

    unweighted = make_schema(BAGS[:4])
    batch = make_batch(unweighted)
    carrying = batch.lists[0]
    carrying = Jagged(carrying.values, carrying.offsets, torch.ones(carrying.values.shape[0]))
    with pytest.raises(ValueError, match=r"lists \['clicked'\] carry element weights but the schema gives none"):
        TorchRecEmbedding(unweighted)(batch._replace(lists=(carrying,)))
    odd = make_schema([{"name": "user", "vocab_size": 30, "embedding_dim": 6}])
    with pytest.raises(ValueError, match=r"multiples of 4; tables \['user'\]"):
        TorchRecEmbedding(odd, fused_optimizer=(torch.optim.SGD, {"lr": 0.1}))
    dotted = make_schema([{"name": "user.id", "vocab_size": 30}])
    with pytest.raises(ValueError, match=r"may not contain '\.': \['user.id'\]"):
        TorchRecEmbedding(dotted)
    other = FeatureEmbedding(make_schema(BAGS[:3]))
    with pytest.raises(ValueError, match="another schema"):
        TorchRecEmbedding(unweighted).load_from(other)


@needs_torchrec
def test_doc_examples():
    from mtlrec.nn import torchrec_embedding

    result = doctest.testmod(torchrec_embedding, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_imports_and_explains_without_torchrec():
    """With torchrec unimportable the module imports; building the layer says how to install it."""
    code = (
        "import sys; sys.modules['torchrec'] = None\n"
        "from mtlrec.nn.torchrec_embedding import TorchRecEmbedding, torchrec_available\n"
        "from mtlrec.schema import Schema\n"
        "assert not torchrec_available()\n"
        "schema = Schema(sparse=[{'name': 'u', 'vocab_size': 3}], tasks=[{'name': 't'}])\n"
        "try:\n"
        "    TorchRecEmbedding(schema)\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs TorchRec: pip install 'mtlrec[torchrec]'" in done.stdout
