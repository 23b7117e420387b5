"""Lists kept as sequences (`pooling: none`) read by the model's sequence encoder (BST): the
block and the encoder against a plain computation of the paper's equations, padding and batch
independence, empty lists, gradients, every model of the zoo, config errors, and every path
(in-memory and streaming training, resume, predict, ONNX, TorchScript, the service)."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from mtlrec import models
from mtlrec.config import ConfigError, load_config
from mtlrec.data.encoder import Encoder
from mtlrec.data.features import Features, Jagged
from mtlrec.experiment import encode_splits, load_splits, run_experiment
from mtlrec.export import export_onnx, export_torchscript
from mtlrec.models.options import SequenceEncoderOptions
from mtlrec.nn.sequence import PaddedSequence, SequenceTransformer, TransformerBlock
from mtlrec.schema import Schema, SparseFeature, Task
from mtlrec.serve import create_app
from mtlrec.trained import TrainedModel, load
from test_export_lists import inputs_of, onnx_feed, random_table
from test_inputs_paths import files_config
from test_reliability import resumed_equals_whole


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread each."""


# ------------------------------------------------------------------ the paper's equations, plainly
def layer_norm(x, norm):
    """LayerNorm of the rows of x `[n, d]`, with `norm`'s eps, gain and bias."""
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


def plain_block(s, block):
    """BST's transformer layer for one row, s `[n, d]` its real positions, weights read from `block`:
    MH(S) = Concat(head_i) W^H, head_i = softmax(S W_i^Q (S W_i^K)^T / sqrt(d)) S W_i^V,
    S' = LN(S + MH(S)), F = LN(S' + LeakyReLU(S' W1 + b1) W2 + b2) (no dropout: eval)."""
    d, h = s.shape[1], block.attention.heads
    project = block.attention.project.weight  # rows: W_1^Q..W_h^Q, W_1^K..W_h^K, W_1^V..W_h^V (transposed)
    heads = []
    for i in range(h):
        w_q, w_k, w_v = (project[(j * h + i) * d:(j * h + i + 1) * d].T for j in range(3))
        heads.append(torch.softmax((s @ w_q) @ (s @ w_k).T / d ** 0.5, dim=1) @ (s @ w_v))
    s1 = layer_norm(s + torch.cat(heads, dim=1) @ block.attention.merge.weight.T, block.attention_norm)
    hidden = F.leaky_relu(s1 @ block.ffn_in.weight.T + block.ffn_in.bias, negative_slope=0.01)
    return layer_norm(s1 + hidden @ block.ffn_out.weight.T + block.ffn_out.bias, block.ffn_norm)


def plain_encoder(items, target, encoder, length, output):
    """One row: items `[n, d]` its elements oldest first, target `[d]` or None -> its encoding.
    The sequence is the target then the elements newest first, each with its recency row."""
    tokens, rows = items.flip(0), list(range(1, len(items) + 1))
    if target is not None:
        tokens, rows = torch.cat([target[None], tokens]), [0, *rows]
    s = torch.cat([tokens, encoder.positions.weight[rows]], dim=1)
    if len(s):
        for block in encoder.blocks:
            s = plain_block(s, block)
    width = s.shape[1]
    if output == "target":
        return s[0]
    if output == "mean":
        return s.mean(0) if len(s) else torch.zeros(width, dtype=s.dtype)
    padded = torch.zeros(length + (target is not None), width, dtype=s.dtype)
    padded[: len(s)] = s
    return padded.flatten()


def test_block_equals_the_papers_equations_row_by_row():
    torch.manual_seed(0)
    block = TransformerBlock(6, heads=3, ffn_hidden=10, dropout=0.3).double().eval()
    s = torch.randn(4, 5, 6, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]
    out = block(s, mask)
    for b in range(4):
        torch.testing.assert_close(out[b, mask[b]], plain_block(s[b, mask[b]], block))


@pytest.mark.parametrize("output, with_target", [("concat", True), ("concat", False), ("mean", True),
                                                 ("mean", False), ("target", True)])
def test_encoder_equals_plain_bst_per_row_and_ignores_padding(output, with_target):
    """Rows of 0..4 elements (0: the target alone, or zeros without one); the padding slots hold
    noise, which must change nothing."""
    torch.manual_seed(1)
    length, dim, lengths = 4, 3, torch.tensor([0, 1, 3, 4, 2])
    options = SequenceEncoderOptions(heads=2, layers=2, position_dim=2, ffn_hidden=7, output=output)
    encoder = SequenceTransformer(dim, length, with_target, options).double().eval()
    with torch.no_grad():
        encoder.positions.weight.normal_()  # the 0.01 start would hide a wrong position
    items = torch.randn(5, length, dim, dtype=torch.float64)  # padding slots: noise
    mask = torch.arange(length) < lengths[:, None]
    target = torch.randn(5, dim, dtype=torch.float64) if with_target else None
    out = encoder(PaddedSequence(items, mask, target))
    assert out.shape == (5, encoder.out_dim)
    for b, n in enumerate(lengths.tolist()):
        expected = plain_encoder(items[b, :n], None if target is None else target[b], encoder, length, output)
        torch.testing.assert_close(out[b], expected)
    if not with_target:
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # an empty list without a target: zeros
    other_noise = torch.where(mask[..., None], items, torch.randn_like(items))
    torch.testing.assert_close(encoder(PaddedSequence(other_noise, mask, target)), out, rtol=0, atol=0)


def test_options_are_typed_and_a_bare_name_stands_for_the_defaults():
    assert SequenceEncoderOptions.model_validate("transformer") == SequenceEncoderOptions()
    with pytest.raises(ValueError, match="heads"):
        SequenceEncoderOptions(heads=0)
    with pytest.raises(ValueError, match="output"):
        SequenceEncoderOptions(output="last")
    with pytest.raises(ValueError, match="needs the list's sequence_target"):
        SequenceTransformer(4, 3, False, SequenceEncoderOptions(output="target"))


# ------------------------------------------------------------------ through the model
def listed_schema() -> Schema:
    """user, item (table items), seen (a sequence over items, against item), tags (a sequence
    without target), all of embedding size 4."""
    return Schema(sparse=[SparseFeature(name="user", vocab_size=10, embedding_dim=4),
                          SparseFeature(name="item", vocab_size=30, embedding_dim=4, embedding="items"),
                          SparseFeature(name="seen", vocab_size=30, embedding_dim=4, embedding="items",
                                        multi_valued=True, max_length=3, pooling="none", sequence_target="item"),
                          SparseFeature(name="tags", vocab_size=6, embedding_dim=4, multi_valued=True, max_length=2,
                                        pooling="none")],
                  tasks=[Task(name="click"), Task(name="like")])


def batch_of(rows: int, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    seen = Jagged.from_lists([torch.randint(1, 30, (int(n),), generator=g).tolist()
                              for n in torch.randint(0, 4, (rows,), generator=g)])
    tags = Jagged.from_lists([torch.randint(1, 6, (int(n),), generator=g).tolist()
                              for n in torch.randint(0, 3, (rows,), generator=g)])
    ids = torch.stack([torch.randint(0, 10, (rows,), generator=g), torch.randint(0, 30, (rows,), generator=g)], 1)
    return Features(ids, torch.zeros(rows, 0), (seen, tags))


def rows_of(features: Features, index: list[int]) -> Features:
    index = torch.tensor(index)
    return Features(features.ids[index], features.dense[index], tuple(j.take(index) for j in features.lists))


@pytest.mark.parametrize("output", ["concat", "mean"])
def test_a_rows_prediction_depends_on_its_lists_only(output):
    torch.manual_seed(0)
    model = models.create("mmoe", listed_schema(), num_experts=2, expert_hidden=[8], tower_hidden=[4],
                          sequence_encoder={"heads": 2, "output": output}).eval()
    batch = batch_of(12)
    assert [len(j) for j in batch.lists] == [12, 12] and 0 in batch.lists[0].lengths  # an empty list among them
    full = model(batch).logits
    for i in range(12):  # each row alone, and after the rows reversed
        torch.testing.assert_close(model(rows_of(batch, [i])).logits[0], full[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(rows_of(batch, list(range(11, -1, -1)))).logits, full.flip(0), atol=1e-6, rtol=0)
    changed = batch._replace(lists=(Jagged.from_lists([[5, 6, 7]] * 12), batch.lists[1]))
    assert (model(changed).logits - full).abs().max() > 1e-3  # the history moves the prediction


def test_gradients_reach_only_the_table_rows_looked_up():
    torch.manual_seed(0)
    model = models.create("mmoe", listed_schema(), num_experts=2, expert_hidden=[8], tower_hidden=[4],
                          sequence_encoder={"heads": 2})
    batch = batch_of(6, seed=3)
    model(batch).logits.sum().backward()
    table = model.embedding.tables[0].weight  # one parameter per embedding size: user, items, tags tables
    starts = {"user": 0, "items": 10, "tags": 40}
    looked_up = ({int(u) for u in batch.ids[:, 0]} | {starts["items"] + int(i) for i in batch.ids[:, 1]}
                 | {starts["items"] + int(v) for v in batch.lists[0].values}
                 | {starts["tags"] + int(v) for v in batch.lists[1].values})
    touched = set(torch.nonzero(table.grad.abs().sum(1)).flatten().tolist())
    assert touched == looked_up
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_sequence_is_not_a_column_of_the_embedded_row():
    model = models.create("mmoe", listed_schema(), expert_hidden=[8], sequence_encoder="transformer")
    assert model.embedding.out_dim == 8  # user and item only
    assert model.input_dim == 8 + 4 * 8 + 2 * 8  # concat: (3 + target) x 8 and 2 x 8 (width 4 + 4)
    with pytest.raises(ValueError, match=r"\['seen'\] have pooling: none"):
        model.embedding.feature_columns(["user", "seen"])
    with pytest.raises(ValueError, match=r"pepnet prior_features: .*\['tags'\] have pooling: none"):
        models.create("pepnet", listed_schema(), prior_features=["tags"], sequence_encoder="transformer")


# ------------------------------------------------------------------ every model of the zoo
def history_config(name: str, rows: int = 500, **encoder) -> dict:
    """Synthetic history (y1 driven by it) with `history` kept as a sequence against `item`."""
    raw = {"seed": 0, "data": {"synthetic": {"rows": rows, "dim": 4, "sin_terms": 0, "task_types": ["binary", "binary"],
                                             "history": {"items": 20, "clusters": 4, "max_length": 6, "strength": 8.0,
                                                         "embedding_dim": 4}}},
           "model": {"name": name}, "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "progress": False}}
    raw = load_config(raw).to_dict()
    history = next(f for f in raw["features"]["sparse"] if f["name"] == "history")
    history |= {"pooling": "none", "sequence_target": "item"}
    size = "hidden" if "hidden" in models.model_options(name) else "expert_hidden"
    raw["model"] = {"name": name, size: [8], "tower_hidden": [8], "sequence_encoder": {"heads": 2, **encoder}}
    return raw


@pytest.fixture(scope="module")
def history_data():
    return encode_splits(load_config(history_config("mmoe")))


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_trains_with_the_encoder_and_reads_the_history(name, history_data):
    cfg = load_config(history_config(name))
    result = run_experiment(cfg, encoded=history_data)
    assert np.isfinite(result.history[-1]["valid/loss"])
    assert sum(isinstance(m, SequenceTransformer) for m in result.trained.model.modules()) >= 1
    table = load_splits(cfg).test.head(50).drop(columns=["y1", "y2"])
    emptied = table.assign(history=[[]] * len(table))
    moved = (result.trained.predict(table) - result.trained.predict(emptied)).abs().to_numpy().max()
    assert moved > 1e-4, moved


# ------------------------------------------------------------------ config errors
SEQ = {"multi_valued": True, "max_length": 5, "pooling": "none"}


@pytest.mark.parametrize("sparse, model, message", [
    ([{"name": "a", "multi_valued": True, "pooling": "none"}], {}, "pooling none needs max_length"),
    ([{"name": "a", "multi_valued": True, "sequence_target": "b"}], {}, "sequence_target is read with pooling: none"),
    ([{"name": "a", "sequence_target": "b"}], {}, r"\['sequence_target'\] apply to lists only"),
    ([{"name": "a", **SEQ, "weight_separator": ":"}], {}, "sum and mean pooling, not none"),
    ([{"name": "a", **SEQ, "sequence_target": "nope"}], {}, "sequence_target 'nope' must be a single-valued"),
    ([{"name": "a", **SEQ, "sequence_target": "b"}, {"name": "b", "embedding_dim": 4}], {},
     "sequence_target 'b' has embedding_dim 4, the list 8"),
    ([{"name": "a", **SEQ}, {"name": "b"}], {},
     r"\['a'\] have pooling: none .* set it \(e.g. sequence_encoder: \{name: transformer\}\)"),
    ([{"name": "a", "multi_valued": True}], {"sequence_encoder": "transformer"},
     "model.sequence_encoder reads the sparse features with pooling: none, and there are none"),
    ([{"name": "a", **SEQ}], {"sequence_encoder": {"output": "target"}},
     r"output 'target' .* \['a'\] have no sequence_target"),
    ([{"name": "a", **SEQ}], {"sequence_encoder": {"heads": 0}}, "sequence_encoder.heads"),
    ([{"name": "a", **SEQ}], {"sequence_encoder": {"name": "lstm"}}, "sequence_encoder.name"),
])
def test_sequence_settings_are_checked_when_the_config_is_read(sparse, model, message):
    raw = {"features": {"sparse": sparse}, "tasks": [{"name": "y"}], "data": {"source": "dataframes"},
           "model": {"name": "mmoe", **model}}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_fused_tables_refuse_sequences_when_the_config_is_read():
    raw = {"features": {"sparse": [{"name": "a", **SEQ}]}, "tasks": [{"name": "y"}], "data": {"source": "dataframes"},
           "model": {"name": "mmoe", "sequence_encoder": "transformer"}, "train": {"embedding_tables": "fused"}}
    with pytest.raises(ConfigError, match=r"\['a'\] have pooling: none, which TorchRec's tables .* embedding_tables: "
                                          "plain"):
        load_config(raw)
    raw["train"] = {}
    schema = load_config(raw).schema
    assert schema.sequences[0].name == "a"
    pytest.importorskip("torchrec")
    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

    with pytest.raises(ValueError, match=r"\['a'\] have pooling: none .* use mtlrec.nn.FeatureEmbedding"):
        TorchRecEmbedding(schema.model_copy(update={"sparse": [schema.sparse[0].model_copy(update={"vocab_size": 8})]}))


# ------------------------------------------------------------------ training paths
def sequence_files_config(tmp_path, **data) -> dict:
    """test_inputs_paths' impressions (click driven by the history `seen` against `item`), with
    `seen` kept as a sequence read by the encoder."""
    raw = copy.deepcopy(files_config(tmp_path, **data))
    seen = next(f for f in raw["features"]["sparse"] if f["name"] == "seen")
    seen |= {"pooling": "none", "sequence_target": "item"}
    raw["model"]["sequence_encoder"] = {"heads": 2, "dropout": 0.0}
    raw["train"]["epochs"] = 2
    return raw


def test_streaming_and_in_memory_training_read_the_sequence(tmp_path):
    streamed = run_experiment(load_config(sequence_files_config(tmp_path, streaming=True, chunk_rows=300,
                                                                shuffle_buffer=500)))
    in_memory = run_experiment(load_config(sequence_files_config(tmp_path)))
    assert streamed.trained.encoder.vocabularies == in_memory.trained.encoder.vocabularies
    table = pd.read_parquet(sequence_files_config(tmp_path)["data"]["test"]).head(100)
    for result in (streamed, in_memory):
        assert np.isfinite(result.history[-1]["valid/loss"])
        emptied = table.assign(seen=[[]] * len(table))
        assert (result.trained.predict(table) - result.trained.predict(emptied)).abs().to_numpy().max() > 1e-3


def test_a_run_with_sequences_resumes_to_the_same_weights_and_loads_to_the_same_predictions(tmp_path, monkeypatch):
    raw = sequence_files_config(tmp_path)
    raw["train"] |= {"epochs": 2, "checkpoint_every": 10}
    whole, _ = resumed_equals_whole(raw, tmp_path, monkeypatch)
    table = pd.read_parquet(raw["data"]["test"])
    np.testing.assert_allclose(load(tmp_path / "m").predict(table), whole.trained.predict(table), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ export and serve
@pytest.fixture(scope="module", params=["concat", "mean", "target"])
def exported(request, tmp_path_factory):
    """An untrained MMoE on two sequences (clicked against item, tags against user for output
    target and alone otherwise) and one mean-pooled list, its weights drawn large enough that
    the lists move the predictions; rows with empty, null, unseen, missing and too long lists."""
    output = request.param
    rng = np.random.default_rng(0)
    listed = {"embedding_dim": 4, "multi_valued": True}
    sparse = [{"name": "user", "embedding_dim": 4}, {"name": "item", "embedding_dim": 4},
              {"name": "clicked", "embedding": "item", "max_length": 4, "pooling": "none", "sequence_target": "item",
               **listed},
              {"name": "tags", "max_length": 3, "pooling": "none", **listed}
              | ({"sequence_target": "user"} if output == "target" else {}),
              {"name": "brands", **listed}]
    cfg = load_config({"features": {"sparse": sparse, "dense": [{"name": "age"}, {"name": "x"}]},
                       "tasks": [{"name": "click"}, {"name": "time", "type": "regression"}],
                       "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4],
                                 "sequence_encoder": {"heads": 2, "output": output}}})
    torch.manual_seed(0)
    trained = TrainedModel.build(cfg, Encoder(cfg.schema).fit(random_table(rng, 300)))
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.normal_(0.0, 0.5)
    table = random_table(rng, 30)
    awkward = {"clicked": [None, list(range(12)), [], [500, 501], [7]],
               "tags": [[], None, ["w1", "unseen"], [f"w{i}" for i in range(9)], [None, "w2", "", "w3"]],
               "item": [3, 4, 99, 5, 6]}  # row 2: an unseen target
    for column, values in awkward.items():
        table[column] = pd.Series(values + table[column].tolist()[len(values):], dtype=object)
    folder = trained.save(tmp_path_factory.mktemp(output) / "model")
    export_onnx(trained, folder / "model.onnx")
    return trained, table, folder


def test_lists_move_the_predictions(exported):
    """The comparisons below can fail: each list changes the predictions."""
    trained, table, _ = exported
    expected = trained.predict(table).to_numpy()
    for name in ("clicked", "tags", "brands"):
        emptied = table.assign(**{name: [[]] * len(table)})
        assert np.abs(trained.predict(emptied).to_numpy() - expected).max() > 1e-3, name


def test_onnx_and_torchscript_equal_predict(exported, tmp_path):
    import onnxruntime

    trained, table, folder = exported
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    for rows in (table, table.head(1), table.iloc[[1, 2]], table.iloc[5:]):  # other sizes than the traced ones
        got = session.run(["predictions"], onnx_feed(trained, rows))[0]
        np.testing.assert_allclose(got, trained.predict(rows).to_numpy(), atol=1e-5, rtol=0)
    scorer = torch.jit.load(str(export_torchscript(trained, tmp_path / "m.pt")))
    singles, lists, weights = inputs_of(trained, table)
    got = scorer(singles, torch.from_numpy(table[["age", "x"]].to_numpy(dtype=np.float32)), lists, weights)
    np.testing.assert_allclose(got.numpy(), trained.predict(table).to_numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_service_equals_predict(exported, backend):
    trained, table, folder = exported
    rows = []
    for record in table.to_dict(orient="records"):
        row = {name: None if pd.isna(record[name]) else record[name] for name in ("user", "item", "age", "x")}
        rows.append(row | {name: record[name] for name in ("clicked", "tags", "brands")})
    body = json.dumps({"rows": rows}, default=int)  # numpy integers as JSON numbers
    client = TestClient(create_app(folder, backend=backend))
    answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    got = pd.DataFrame(answer.json()["predictions"])[["click", "time"]].to_numpy()
    np.testing.assert_allclose(got, load(folder).predict(pd.DataFrame(json.loads(body)["rows"])).to_numpy(),
                               atol=1e-5, rtol=0)
