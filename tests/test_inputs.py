"""Multi-valued features, shared tables, target attention and sample weights: each against a
plain per-row computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtlrec import models
from mtlrec.data import DataError, Encoder, read_table, write_table
from mtlrec.data.features import Features, Jagged
from mtlrec.nn import FeatureEmbedding
from mtlrec.nn.pooling import TargetAttention, padded_rows, pool
from mtlrec.schema import Attention, DenseFeature, Schema, SparseFeature, Task
from mtlrec.tasks import TaskSet
from mtlrec.train.metrics import auc, log_loss

LISTS = [[3, 1, 4], [], [1], [5, 9, 2, 6], [], [5]]


def random_lists(rows: int, vocab: int, longest: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, longest + 1)).tolist() for _ in range(rows)]


# -- the jagged layout ---------------------------------------------------------------------------


def test_jagged_take_rows_concat_equal_list_operations():
    lists = random_lists(40, 50, 7)
    weights = [[float(v) / 10 for v in row] for row in lists]
    j = Jagged.from_lists(lists, weights)
    index = torch.tensor([5, 0, 39, 5, 17, 2])
    taken = j.take(index)
    assert [taken.values[taken.offsets[i]:taken.offsets[i + 1]].tolist() for i in range(len(index))] == \
        [lists[i] for i in index.tolist()]
    torch.testing.assert_close(taken.weights, torch.tensor([w for i in index.tolist() for w in weights[i]]))
    part = j.rows(10, 20)
    assert part.offsets[0] == 0 and [part.values[part.offsets[i]:part.offsets[i + 1]].tolist()
                                      for i in range(10)] == lists[10:20]
    joined = j.rows(0, 10).concat(j.rows(10, 40))
    assert torch.equal(joined.values, j.values) and torch.equal(joined.offsets, j.offsets)
    empty = Jagged.from_lists([[], []]).take(torch.tensor([1, 0, 1]))
    assert empty.values.numel() == 0 and empty.offsets.tolist() == [0, 0, 0, 0]


# -- pooling against a loop over rows --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooling_equals_a_loop_over_the_lists(mode, weighted):
    if weighted and mode == "max":
        pytest.skip("max pooling takes no element weights")
    torch.manual_seed(0)
    table = torch.randn(10, 4, dtype=torch.float64)
    w = [[0.5 + i for i, _ in enumerate(row)] for row in LISTS] if weighted else None
    j = Jagged.from_lists(LISTS, w)
    out = pool(table, j.values, j.offsets, mode, None if w is None else j.weights.double())
    for i, row in enumerate(LISTS):
        if not row:
            expected = torch.zeros(4, dtype=torch.float64)  # an empty list pools to zeros
        else:
            rows = table[row] * (torch.tensor(w[i], dtype=torch.float64)[:, None] if w else 1)
            expected = {"sum": rows.sum(0), "max": rows.max(0).values,
                        "mean": rows.sum(0) / (sum(w[i]) if w else len(row))}[mode]
        torch.testing.assert_close(out[i], expected)


def list_schema(pooling="mean", **extra) -> Schema:
    attention = {"attention": Attention(target="item", hidden=[6]), "max_length": 4} if pooling == "attention" else {}
    return Schema(
        sparse=[SparseFeature(name="user", vocab_size=7, embedding_dim=4),
                SparseFeature(name="item", vocab_size=10, embedding_dim=4, embedding="items"),
                SparseFeature(name="seen", vocab_size=10, embedding_dim=4, embedding="items", multi_valued=True,
                              pooling=pooling, **attention, **extra)],
        dense=[DenseFeature(name="age")], tasks=[Task(name="click"), Task(name="like")])


def test_shared_table_is_one_parameter_read_by_single_ids_and_lists():
    embed = FeatureEmbedding(list_schema("sum"))
    (table,) = embed.tables
    assert table.num_embeddings == 7 + 10  # user's rows, then the one item table
    seen = Jagged.from_lists(LISTS)
    ids = torch.tensor([[0, 3]] * len(LISTS))
    x = embed(Features(ids, torch.zeros(len(LISTS), 1), (seen,)))
    torch.testing.assert_close(x[:, 4:8], table.weight[7 + 3].expand(len(LISTS), -1))  # item 3
    torch.testing.assert_close(x[0, 8:12], table.weight[7 + torch.tensor(LISTS[0])].sum(0))  # the same rows


def test_gradients_reach_only_the_rows_looked_up():
    embed = FeatureEmbedding(list_schema("mean"))
    seen = Jagged.from_lists([[2, 4], [], [4, 8]])
    embed(Features(torch.tensor([[1, 6], [0, 6], [5, 6]]), torch.zeros(3, 1), (seen,))).sum().backward()
    touched = embed.tables[0].weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == sorted({1, 0, 5} | {7 + i for i in (6, 2, 4, 8)})


def plain_din(query, keys, linears, prelus, softmax):
    """DIN's activation unit for one row, from the paper: MLP([q, k, q - k, q * k]) per element,
    PReLU(x) = max(0, x) + a min(0, x); pooled sum_i a_i k_i (softmax over the row if asked)."""
    scores = []
    for k in keys:
        h = torch.cat([query, k, query - k, query * k])
        for i, (weight, bias) in enumerate(linears):
            h = h @ weight.T + bias
            if i < len(prelus):
                h = torch.clamp(h, min=0) + prelus[i] * torch.clamp(h, max=0)
        scores.append(h[0])
    if not scores:
        return torch.zeros_like(query)
    a = torch.stack(scores)
    if softmax:
        a = torch.softmax(a, 0)
    return sum(a[i] * k for i, k in enumerate(keys))


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_equals_the_papers_unit(softmax):
    torch.manual_seed(1)
    schema = list_schema("attention")
    schema.sparse[2].attention.softmax = softmax
    embed = FeatureEmbedding(schema).double()
    lists = [[3, 1, 4], [], [1], [5, 9, 2, 6], [7]]
    items = torch.tensor([2, 5, 1, 9, 0])
    x = embed(Features(torch.stack([torch.zeros(5, dtype=torch.long), items], 1), torch.zeros(5, 1).double(),
                       (Jagged.from_lists(lists),)))
    unit: TargetAttention = embed.attention["0"].attention
    layers = [m for m in unit.score if isinstance(m, torch.nn.Linear)]
    linears = [(m.weight, m.bias) for m in layers]
    prelus = [m.weight for m in unit.score if isinstance(m, torch.nn.PReLU)]
    table = embed.tables[0].weight
    for i, row in enumerate(lists):
        expected = plain_din(table[7 + items[i]], [table[7 + v] for v in row], linears, prelus, softmax)
        torch.testing.assert_close(x[i, 8:12], expected)


def test_every_model_reads_lists_and_trains_on_them():
    schema = list_schema("mean")
    seen = Jagged.from_lists(LISTS)
    features = Features(torch.tensor([[1, 2]] * len(LISTS)), torch.randn(len(LISTS), 1), (seen,))
    for name in models.list_models():
        model = models.create(name, schema)
        out = model(features)
        assert out.logits.shape == (len(LISTS), 2)
        out.logits.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads, name


# -- sample weights ------------------------------------------------------------------------------------


def test_weighted_loss_is_the_weighted_mean_over_the_sample_space():
    schema = Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="c"), Task(name="r", type="regression")])
    logits = torch.tensor([[0.3, 1.0], [-1.2, 2.0], [2.0, -0.5], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.5], [0.0, 2.5], [1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    weights = torch.tensor([[2.0, 1.0], [0.5, 3.0], [1.0, 0.0], [0.0, 4.0]])
    losses = TaskSet(schema).losses(logits, labels, mask, weights)
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0], reduction="none")
    c = (2.0 * bce[0] + 0.5 * bce[1]) / 2.5  # rows 0, 1 (row 2 outside, row 3 weight 0)
    r = (1.0 * 0.25 + 4.0 * 1.0) / 5.0  # rows 0, 3 (row 1 outside, row 2 weight 0)
    torch.testing.assert_close(losses, torch.stack([c, torch.tensor(r)]))
    zero = TaskSet(schema).losses(logits, labels, mask, torch.zeros(4, 2))
    assert torch.equal(zero, torch.zeros(2))


def test_integer_weights_equal_repeated_rows_in_loss_and_metrics():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 30).astype(float), rng.random(30).round(1)  # ties too
    w = rng.integers(0, 4, 30)
    assert auc(y, p, w.astype(float)) == pytest.approx(auc(np.repeat(y, w), np.repeat(p, w)))
    assert log_loss(y, p, w.astype(float)) == pytest.approx(log_loss(np.repeat(y, w), np.repeat(p, w)))


# -- reading list columns -------------------------------------------------------------------------------


def table_with_lists() -> pd.DataFrame:
    return pd.DataFrame({
        "user": ["a", "b", "a", "c", "b", "a"],
        "item": [1, 2, 3, 2, 5, 1],
        "seen": [[1, 2], [], [3, 1, 2, 9], None, [5], [2, 2]],
        "tags": ["x|y", "", "y", None, "z|x|y", "x"],
        "age": [20.0, 30.0, 40.0, 25.0, 35.0, 45.0],
        "click": [1, 0, 1, 0, 1, 0], "like": [0, 0, 1, 1, 0, 1], "w": [1.0, 2.0, 0.5, 1.0, 3.0, 1.0],
    })


def table_schema(**seen) -> Schema:
    return Schema(sparse=[SparseFeature(name="user"), SparseFeature(name="item", embedding="items"),
                          SparseFeature(name="seen", embedding="items", multi_valued=True, **seen),
                          SparseFeature(name="tags", multi_valued=True, pooling="sum")],
                  dense=[DenseFeature(name="age")], tasks=[Task(name="click"), Task(name="like")],
                  sample_weight="w")


def decoded(encoder: Encoder, table: str, jagged: Jagged) -> list[list[str]]:
    vocab = ["<oov>"] + encoder.vocabularies[table]
    return [[vocab[v] for v in jagged.values[jagged.offsets[i]:jagged.offsets[i + 1]].tolist()]
            for i in range(len(jagged))]


def test_shared_tables_share_one_vocabulary_counted_over_both_columns():
    table = table_with_lists()
    encoder = Encoder(table_schema()).fit(table)
    assert encoder.vocabularies["items"] == ["1", "2", "3", "5", "9"] and "seen" not in encoder.vocabularies
    data = encoder.transform(table)
    assert decoded(encoder, "items", data.lists[0]) == [["1", "2"], [], ["3", "1", "2", "9"], [], ["5"], ["2", "2"]]
    assert decoded(encoder, "tags", data.lists[1]) == [["x", "y"], [], ["y"], [], ["z", "x", "y"], ["x"]]
    assert encoder.schema.sparse[1].vocab_size == encoder.schema.sparse[2].vocab_size == 6
    torch.testing.assert_close(data.weights, torch.tensor([[1.0, 2.0, 0.5, 1.0, 3.0, 1.0]] * 2).T)


def test_max_length_keeps_the_last_elements_and_min_freq_counts_over_the_table():
    table = table_with_lists()
    encoder = Encoder(table_schema(max_length=2)).fit(table)
    data = encoder.transform(table)
    assert decoded(encoder, "items", data.lists[0])[2] == ["2", "9"]
    counted = Encoder(Schema(sparse=[SparseFeature(name="item", embedding="t", min_freq=3),
                                     SparseFeature(name="seen", embedding="t", min_freq=3, multi_valued=True)],
                             tasks=[Task(name="click")])).fit(table)
    assert counted.vocabularies["t"] == ["1", "2"]  # 1: 2 + 2 times, 2: 2 + 4 times, 3: 1 + 1


def test_csv_text_lists_parquet_lists_and_dataframe_lists_encode_alike(tmp_path):
    table = table_with_lists()
    encoder = Encoder(table_schema()).fit(table)
    expected = encoder.transform(table)
    as_text = table.assign(seen=["1|2", "", "3|1|2|9", None, "5", "2|2"])
    write_table(as_text, tmp_path / "t.csv")
    write_table(table, tmp_path / "t.parquet")
    for path in ("t.csv", "t.parquet"):
        got = encoder.transform(read_table(tmp_path / path))
        for a, b in zip(got.lists, expected.lists):
            assert torch.equal(a.values, b.values) and torch.equal(a.offsets, b.offsets), path


def test_a_csv_list_column_of_single_numbers_is_lists_of_one(tmp_path):
    table = pd.DataFrame({"seen": [4, 7, None, 4], "click": [1, 0, 1, 0]})
    write_table(table, tmp_path / "t.csv")
    read = read_table(tmp_path / "t.csv")
    schema = Schema(sparse=[SparseFeature(name="seen", multi_valued=True)], tasks=[Task(name="click")])
    encoder = Encoder(schema).fit(read)
    assert decoded(encoder, "seen", encoder.transform(read).lists[0]) == [["4"], ["7"], [], ["4"]]


def test_element_weights_inline_and_as_a_column():
    table = pd.DataFrame({"tags": ["a:0.5|b:2", "", "b:1.5"], "tw": [[0.5, 2.0], [], [1.5]],
                          "plain": ["a|b", "", "b"], "click": [1, 0, 1]})
    inline = Schema(sparse=[SparseFeature(name="tags", multi_valued=True, weight_separator=":")],
                    tasks=[Task(name="click")])
    column = Schema(sparse=[SparseFeature(name="plain", multi_valued=True, weights="tw")], tasks=[Task(name="click")])
    for schema, name in ((inline, "tags"), (column, "plain")):
        encoder = Encoder(schema).fit(table)
        j = encoder.transform(table).lists[0]
        assert decoded(encoder, name, j) == [["a", "b"], [], ["b"]]
        torch.testing.assert_close(j.weights, torch.tensor([0.5, 2.0, 1.5]))


# -- bad input: an error naming the feature, the column and the row -------------------------------------


def one_list_schema(**extra) -> Schema:
    return Schema(sparse=[SparseFeature(name="seen", multi_valued=True, **extra)], tasks=[Task(name="click")])


@pytest.mark.parametrize("cells, message", [
    ([[1, 2], 7, [3]], r"sparse feature 'seen' \(a list column\): row 1 holds 7, not a list"),
    ([[1, 2], [[3, 4]], [3]], r"'seen' \(a list column\): row 1 holds a nested list \[3, 4\]"),
    ([[1, 2], "3|4", [3]], r"row 1 holds the text '3\|4' among lists"),
    ([[1, 2.5], [3], []], r"sparse column 'seen': row 0 holds 2.5, not a whole number"),
    ([[1, {"a": 1}], [3], []], r"row 0 holds a nested dict"),
])
def test_bad_list_cells_are_errors_naming_feature_and_row(cells, message):
    table = pd.DataFrame({"seen": cells, "click": [1, 0, 1]})
    with pytest.raises(DataError, match=message):
        Encoder(one_list_schema()).fit(table)


def test_a_wrong_separator_is_caught_at_fit():
    table = pd.DataFrame({"seen": ["a,b", "c", "b,c,d", "a,d"], "click": [1, 0, 1, 0]})
    with pytest.raises(DataError, match=r"no row holds its separator '\|' but most hold ','; set separator: ','"):
        Encoder(one_list_schema()).fit(table)
    Encoder(one_list_schema(separator=",")).fit(table)


def test_bad_element_weights_are_errors():
    table = pd.DataFrame({"seen": ["a:1|b", "c:2"], "click": [1, 0]})
    with pytest.raises(DataError, match=r"row 0: element 'b' has no weight after ':'"):
        Encoder(one_list_schema(weight_separator=":")).fit(table)
    table = pd.DataFrame({"seen": [["a", "b"], ["c"]], "sw": [[1.0], [2.0]], "click": [1, 0]})
    with pytest.raises(DataError, match=r"element weights 'sw' of sparse feature 'seen': row 0 holds 1 weights for 2"):
        Encoder(one_list_schema(weights="sw")).fit(table)


def test_a_list_in_a_dense_column_is_an_error_saying_what_to_do():
    table = pd.DataFrame({"x": [[1.0, 2.0], [3.0]], "click": [1, 0]})
    schema = Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="click")])
    with pytest.raises(DataError, match=r"column 'x' must be numeric: row 0 holds a list.*multi_valued: true"):
        Encoder(schema).fit(table)


def test_bad_sample_weights_name_the_row():
    table = table_with_lists().assign(w=[1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(DataError, match=r"sample weight column 'w' must hold a finite number >= 0.*row 1 holds -1.0"):
        Encoder(table_schema()).fit(table).transform(table)


@pytest.mark.parametrize("feature, message", [
    ({"name": "a", "pooling": "sum"}, r"apply to lists only; set multi_valued: true"),
    ({"name": "a", "max_length": 3}, r"\['max_length'\] apply to lists only"),
    ({"name": "a", "multi_valued": True, "pooling": "attention"}, r"pooling: attention and an attention block"),
    ({"name": "a", "multi_valued": True, "pooling": "attention", "attention": {"target": "b"}}, r"needs max_length"),
    ({"name": "a", "multi_valued": True, "pooling": "max", "weight_separator": ":"}, r"sum and mean pooling, not max"),
])
def test_list_options_are_checked_when_the_config_is_read(feature, message):
    with pytest.raises(ValueError, match=message):
        SparseFeature(**feature)


def test_shared_tables_and_attention_targets_are_checked():
    with pytest.raises(ValueError, match=r"share table 't' but differ in embedding_dim"):
        Schema(sparse=[SparseFeature(name="a", embedding="t"), SparseFeature(name="b", embedding="t", embedding_dim=4)],
               tasks=[Task(name="y")])
    seq = {"multi_valued": True, "pooling": "attention", "max_length": 5}
    with pytest.raises(ValueError, match=r"attention target 'nope' must be a single-valued sparse feature"):
        Schema(sparse=[SparseFeature(name="a", **seq, attention={"target": "nope"})], tasks=[Task(name="y")])
    with pytest.raises(ValueError, match=r"attention target 'b' has embedding_dim 4, the list 8"):
        Schema(sparse=[SparseFeature(name="a", **seq, attention={"target": "b"}),
                       SparseFeature(name="b", embedding_dim=4)], tasks=[Task(name="y")])


def test_printed_python_lists_in_csv_are_an_error_and_write_table_joins_lists(tmp_path):
    table = pd.DataFrame({"seen": [[1, 2], [3], []], "click": [1, 0, 1]})
    table.to_csv(tmp_path / "printed.csv", index=False)  # pandas prints "[1, 2]"
    with pytest.raises(DataError, match=r"look like printed Python lists \('\[1, 2\]'\)"):
        Encoder(one_list_schema()).fit(read_table(tmp_path / "printed.csv"))
    write_table(table, tmp_path / "joined.csv")
    assert read_table(tmp_path / "joined.csv")["seen"].tolist()[:2] == ["1|2", "3"]


def test_a_weighted_mean_whose_weights_sum_to_zero_pools_to_zero_with_finite_gradients():
    table = torch.randn(5, 3, requires_grad=True)
    j = Jagged.from_lists([[1, 2], [3]], [[0.0, 0.0], [2.0]])
    out = pool(table, j.values, j.offsets, "mean", j.weights)
    assert torch.equal(out[0], torch.zeros(3))
    out.sum().backward()
    assert torch.isfinite(table.grad).all()


def test_padding_keeps_the_last_elements_of_a_list_longer_than_the_length():
    """A list handed to attention or a kept sequence longer than max_length (built by hand,
    not through the encoder, which cuts it) reads its last elements, as max_length promises."""
    lists = Jagged.from_lists([[5, 6, 7, 8], [9], []])
    positions, mask = lists.padded(3)
    values = lists.values.tolist() + [None]  # position V: padding
    assert [[values[p] for p, m in zip(row, keep) if m] for row, keep in zip(positions.tolist(), mask.tolist())] == \
        [[6, 7, 8], [9], []]
    cut = Jagged.from_lists([[6, 7, 8], [9], []])
    table = torch.randn(10, 2)
    long_rows, long_mask = padded_rows(table, lists.values, lists, 3)
    cut_rows, cut_mask = padded_rows(table, cut.values, cut, 3)
    assert torch.equal(long_rows, cut_rows) and torch.equal(long_mask, cut_mask)
