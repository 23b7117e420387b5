"""Dynamic INT8 export: smaller, predictions and AUC close to the trained model, the vocabulary
lookups untouched, the dense features' part of the first layer kept in float, and the CLI."""

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch

import mtlrec
from mtlrec.cli import main
from mtlrec.config import load_config
from mtlrec.data.encoder import Encoder
from mtlrec.export import export_onnx
from mtlrec.quantize import _keep_in_float, _merge_opset_imports, agreement, export_int8, quantize_onnx
from mtlrec.trained import TrainedModel

WORDS = [f"w{i}" for i in range(10)]


def make_table(rng, n: int) -> pd.DataFrame:
    """Two categorical features, a list feature and two dense ones, `spend` with a long tail
    (log-normal: standardised values reach ~15 while most are within ±1)."""
    user, item = rng.integers(0, 40, n), rng.integers(0, 60, n)
    tags = [list(rng.choice(WORDS, rng.integers(0, 4))) for _ in range(n)]
    spend, x = rng.lognormal(0.0, 2.0, n), rng.normal(size=n)
    user_effect, item_effect = np.random.default_rng(7).normal(size=(2, 60))
    tag_effect = np.array([sum(0.3 * (int(t[1:]) % 3 - 1) for t in row) for row in tags])
    logit = user_effect[user] + item_effect[item] + 2 * x + 0.5 * np.log1p(spend) + tag_effect - 1.0
    return pd.DataFrame({"user": [f"u{u}" for u in user], "item": item, "tags": tags, "spend": spend, "x": x,
                         "click": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
                         "watch": 2 * x + item_effect[item] + rng.normal(size=n)})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A PLE whose layers (256 wide) outweigh its tables, trained on `make_table` rows and
    saved; 1,000 fresh labelled rows (an unseen user and a missing dense value among them)."""
    folder = tmp_path_factory.mktemp("int8") / "model"
    config = {"seed": 0,
              "features": {"sparse": ["user", "item", {"name": "tags", "multi_valued": True}],
                           "dense": ["spend", "x"]},
              "tasks": ["click", {"name": "watch", "type": "regression"}],
              "model": {"name": "ple", "expert_hidden": [256], "tower_hidden": [64], "batch_norm": True},
              "train": {"epochs": 2, "batch_size": 256, "lr": 0.005, "progress": False}}
    trained = mtlrec.fit(config, train=make_table(np.random.default_rng(0), 4000), folder=folder)
    table = make_table(np.random.default_rng(1), 1000)
    table.loc[0, "user"] = "never seen"
    table.loc[1, "x"] = np.nan
    return trained, folder, table


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The model's fp32 export and its INT8 quantisation (`Quantized`)."""
    trained, _, _ = model
    folder = tmp_path_factory.mktemp("exported")
    return export_onnx(trained, folder / "m.onnx"), export_int8(trained, folder / "m.int8.onnx")


def raw_feed(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The exported graph's inputs: sparse values as text, the list's elements end to end with
    each row's length, the dense matrix."""
    return {"user": np.array(table["user"].astype(str), dtype=object),
            "item": np.array(table["item"].astype(str), dtype=object),
            "tags": np.array([t for row in table["tags"] for t in row], dtype=object),
            "tags.lengths": np.array([len(row) for row in table["tags"]], dtype=np.int64),
            "dense": table[["spend", "x"]].to_numpy(dtype=np.float32)}


def run(path, table) -> np.ndarray:
    return onnxruntime.InferenceSession(str(path)).run(["predictions"], raw_feed(table))[0]


def test_int8_is_smaller_and_predicts_close_to_the_model(model, exported):
    trained, _, table = model
    fp32, quantized = exported
    assert quantized.int8_bytes == quantized.path.stat().st_size and quantized.fp32_bytes == fp32.stat().st_size
    assert quantized.size_ratio > 3.0  # weights dominate: 4x for them, less the float parts and the graph
    assert quantized.eight_bit_values > 20 * quantized.float_values
    assert quantized.quantized_products >= 5 and quantized.split_layers == 2  # experts and gate of level 0
    assert quantized.float_products == 2 + 2  # their dense parts, and the two towers' last layers
    expected = trained.predict(table).to_numpy()
    got = run(quantized.path, table)  # the whole graph, raw strings in
    assert got.shape == expected.shape
    assert np.abs(got[:, 0] - expected[:, 0]).max() < 0.05  # click probability
    # watch, a value no sigmoid squashes: 8-bit steps are ~0.4 % of each activation range
    watch, spread = np.abs(got[:, 1] - expected[:, 1]), expected[:, 1].std()
    assert watch.mean() < 0.01 * spread and watch.max() < 0.1 * spread
    assert np.abs(got - expected).max() > 1e-4  # it did change: the weights are quantised


def test_int8_keeps_the_auc(model, exported):
    """AUC changes only where two rows' order flips; prediction changes of ~1e-2 flip only near
    ties, so over 1,000 rows the change stays far below 0.005 (census: 1e-4)."""
    trained, _, table = model
    fp32, quantized = exported
    checked = agreement(trained, quantized.path, table)
    evaluated = {k: v for k, v in trained.evaluate(table).items() if k in checked.trained_metrics}
    assert "auc/click" in evaluated and "mse/watch" in evaluated  # the model's own metrics, checked below
    assert all(checked.trained_metrics[k] == pytest.approx(v, rel=1e-6) for k, v in evaluated.items())
    assert checked.trained_metrics["auc/click"] > 0.8  # a model worth keeping: the bound is not met by chance
    assert abs(checked.metric_change["auc/click"]) < 0.005
    difference = np.abs(run(quantized.path, table) - trained.predict(table).to_numpy()).max(axis=0)
    assert [checked.max_difference[t] for t in ("click", "watch")] == pytest.approx(difference, abs=1e-6)
    same = agreement(trained, fp32, table)
    assert max(same.max_difference.values()) < 1e-5 and max(map(abs, same.metric_change.values())) < 1e-6


def test_the_vocabulary_lookups_and_inputs_are_untouched(exported):
    fp32, int8 = (onnx.load(str(path)) for path in (exported[0], exported[1].path))
    lookups = [sorted(n.SerializeToString() for n in m.graph.node if n.op_type == "LabelEncoder") for m in (fp32, int8)]
    assert len(lookups[0]) == 3 and lookups[0] == lookups[1]
    assert [i.SerializeToString() for i in fp32.graph.input] == [i.SerializeToString() for i in int8.graph.input]
    assert [o.name for o in int8.graph.output] == ["predictions"]


def test_the_float_parts_are_exact_and_needed(model, exported, tmp_path):
    """Keeping the dense features' part of the first layer and the towers' last layers in float
    is exact before quantisation (the rewrite computes what the export did), and is why the
    INT8 model is close: quantising every product whole moves the predictions far more."""
    _, _, table = model
    fp32, quantized = exported
    rewritten = onnx.load(str(fp32))
    _merge_opset_imports(rewritten)
    split, keep_float = _keep_in_float(rewritten)
    assert (split, len(keep_float)) == (2, 4)
    weights = {t.name: t for t in rewritten.graph.initializer}
    widths = sorted(weights[n.input[1]].dims[0] for n in rewritten.graph.node if n.name in keep_float)
    assert widths == [2, 2, 64, 64]  # the dense rows (spend, x) of two layers; the towers' last layers
    onnx.save(rewritten, str(tmp_path / "rewritten.onnx"))
    expected = run(fp32, table)
    np.testing.assert_allclose(run(tmp_path / "rewritten.onnx", table), expected, atol=1e-5, rtol=0)

    from onnxruntime.quantization import quantize_dynamic

    whole = onnx.load(str(fp32))
    _merge_opset_imports(whole)
    quantize_dynamic(whole, str(tmp_path / "whole.onnx"), op_types_to_quantize=["MatMul"])
    ours = np.abs(run(quantized.path, table) - expected).mean(axis=0)
    naive = np.abs(run(tmp_path / "whole.onnx", table) - expected).mean(axis=0)
    assert (naive > 3 * ours).all()


def test_embedding_tables_in_eight_bits(model, tmp_path):
    """An (untrained) model without list features: its table is stored in 8 bits, the file is
    smaller than without, and its predictions stay close to the fp32 export's."""
    _, _, table = model
    table = table.drop(columns="tags")
    config = load_config({"features": {"sparse": ["user", "item"], "dense": ["spend", "x"]},
                          "tasks": ["click", {"name": "watch", "type": "regression"}],
                          "model": {"name": "mmoe", "expert_hidden": [64], "tower_hidden": [16]}})
    torch.manual_seed(0)
    untrained = TrainedModel.build(config, Encoder(config.schema).fit(table))
    fp32 = export_onnx(untrained, tmp_path / "m.onnx")
    plain = quantize_onnx(fp32, tmp_path / "plain.onnx")
    tables = quantize_onnx(fp32, tmp_path / "tables.onnx", embeddings=True)
    assert (plain.quantized_tables, tables.quantized_tables) == (0, 1)
    rows = 1 + table["user"].nunique() + 1 + table["item"].nunique()  # both features' ids, 0 for unseen, in one table
    values = rows * untrained.schema.sparse[0].embedding_dim
    assert tables.eight_bit_values - plain.eight_bit_values == values + 1  # and its zero point
    assert plain.float_values - tables.float_values == values - 1  # less its scale
    assert tables.int8_bytes < plain.int8_bytes
    feed = {k: v for k, v in raw_feed(table.assign(tags=[[]] * len(table))).items() if not k.startswith("tags")}
    got, expected = (onnxruntime.InferenceSession(str(p)).run(["predictions"], feed)[0] for p in (tables.path, fp32))
    assert np.abs(got - expected)[:, 0].max() < 0.05


def test_tables_a_list_feature_pools_stay_in_float(model, exported, tmp_path):
    trained, _, _ = model
    with pytest.warns(UserWarning, match="embedding lookup.* left in float: their table is also read by a list"):
        tables = export_int8(trained, tmp_path / "tables.onnx", embeddings=True)
    assert tables.quantized_tables == 0 and tables.eight_bit_values == exported[1].eight_bit_values


def test_a_graph_without_weights_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match="holds no weight the dynamic quantiser can store in 8 bits"):
        quantize_onnx(tmp_path / "relu.onnx", tmp_path / "relu.int8.onnx")
    assert not (tmp_path / "relu.int8.onnx").exists()
    with pytest.raises(ValueError, match="needs a path of its own"):
        quantize_onnx(tmp_path / "relu.onnx", tmp_path / "relu.onnx")


def test_cli_export_int8(model, tmp_path, capsys):
    trained, folder, table = model
    table.to_parquet(tmp_path / "rows.parquet")
    assert main(["export", str(folder), "--int8", "--check", str(tmp_path / "rows.parquet")]) == 0
    out = capsys.readouterr().out
    path = folder / "model.int8.onnx"
    assert out.startswith(f"wrote {path}: {path.stat().st_size / 1e6:.2f} MB (fp32 ")
    assert "x smaller" in out and "auc/click" in out and "largest |export - trained| over 1,000 rows" in out
    again = export_int8(trained, tmp_path / "again.onnx").path
    np.testing.assert_allclose(run(path, table), run(again, table), atol=1e-6)
    with pytest.warns(UserWarning, match="left in float"):  # the tables a list feature pools
        assert main(["export", str(folder), "--int8", "--int8-embeddings", "--out", str(tmp_path / "t.onnx")]) == 0
    assert "; 0 embedding tables in 8 bits" in capsys.readouterr().out and (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("flags, message", [
    (["--format", "torchscript", "--int8"], "--int8: ONNX only"),
    (["--format", "torchscript", "--check", "rows.csv"], "--check: ONNX only"),
    (["--int8-embeddings"], "--int8-embeddings quantises the tables of an --int8 export: add --int8"),
])
def test_cli_refuses_int8_flags_that_do_not_apply(model, flags, message, capsys):
    _, folder, _ = model
    assert main(["export", str(folder), *flags]) == 2
    assert message in capsys.readouterr().err
