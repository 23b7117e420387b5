"""Export a trained model for serving without mtlrec: ONNX and TorchScript, from raw feature
values to per-task predictions (probabilities for binary tasks, values for regression, the
class probabilities of a multiclass task).

Both take each sparse feature as strings (its category as the encoder saw it: "3" for the
integer 3, "" or any unseen value for out-of-vocabulary) and the dense features raw, as one
float matrix in schema order (NaN for missing: it becomes the training mean). The vocabulary
lookup and the scaling are part of the exported graph; hashed features (`hash_buckets`)
cannot be exported, since the hash is pandas', not an ONNX operator.

A multi-valued (list) feature is given as its rows' elements laid end to end and the number
of elements in each row. The graph reads the list as `mtlrec.data.lists` reads a column: an
empty-string element is missing and dropped (with its weight), an unseen one gets id 0, and
a row longer than the feature's `max_length` keeps its last `max_length` elements, so raw
lists go in untruncated. A feature with element weights (`weights` or `weight_separator`)
takes the weights apart from the elements (for inline weights, "drama:0.7" is given as the
element "drama" and the weight 0.7).

ONNX inputs, N rows:
- a single-valued sparse feature: a string tensor `[N]` named as the feature;
- a list feature: `<name>`, a string tensor `[V]` of every row's elements end to end,
  `<name>.lengths` int64 `[N]` (elements per row; they sum to V), and, with element weights,
  `<name>.weights` float32 `[V]`;
- `dense` `[N, D]` float32.
Output `predictions` `[N, L]`: one column per task, in schema order, but C for a
multiclass task of C classes (its class probabilities, in class order), so the columns are
`TrainedModel.predict`'s (`TaskSet.output_names`); L = T without multiclass tasks. Inputs
are listed in schema order, `dense` last.
TorchScript: `module(sparse: Dict[str, List[str]], dense: Tensor[N, D],
lists: Optional[Dict[str, List[List[str]]]], weights: Optional[Dict[str, List[List[float]]]])
-> Tensor[N, L]`: single-valued features in `sparse`, each list feature as one list of strings
per row in `lists`, the element weights of a weighted list feature under its name in `weights`.
"""

# no `from __future__ import annotations`: TorchScript reads RawScorer's annotations as types, not text
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from mtlrec.data.features import Features, Jagged
from mtlrec.schema import Schema, SparseFeature
from mtlrec.tasks import TaskSet
from mtlrec.trained import TrainedModel

MISSING = -1  # the code of a missing element of a list, dropped before the model


def weighted(feature: SparseFeature) -> bool:
    """Whether a list feature's elements carry weights."""
    return bool(feature.weights or feature.weight_separator)


def list_input_names(feature: SparseFeature) -> list[str]:
    """The names of a list feature's encoded inputs: codes `[V]`, lengths `[N]` (, weights `[V]`)."""
    return [f"{feature.name}.codes", f"{feature.name}.lengths"] + ([f"{feature.name}.weights"] if weighted(feature) else [])


def jagged_from_codes(codes: Tensor, lengths: Tensor, weights: Tensor | None, max_length: int | None) -> Jagged:
    """Rows' lists as given -> the model's `Jagged`, as `mtlrec.data.lists` reads a column:
    missing elements dropped, each row's last `max_length` elements kept.

    codes `[V]` int64: vocabulary ids, `MISSING` (-1) for a missing element; lengths `[N]`
    int64, summing to V; weights `[V]` float32 or None. Traceable: no Python loop over rows
    and no size taken from the example."""
    present = codes >= 0
    before = torch.cat([codes.new_zeros(1), present.long().cumsum(0)])  # [V + 1]: present elements before each
    ends = lengths.cumsum(0)
    starts = ends - lengths
    kept_lengths = before.index_select(0, ends) - before.index_select(0, starts)
    keep = present
    if max_length is not None:
        first_of_rows = torch.zeros_like(before).scatter_add(0, starts, torch.ones_like(starts))
        row = first_of_rows.cumsum(0)[:-1] - 1  # [V]: the row of each element
        after = before.index_select(0, ends.index_select(0, row)) - before[1:]  # present elements after it in its row
        keep = present & (after < max_length)
        kept_lengths = kept_lengths.clamp(max=max_length)
    offsets = torch.cat([lengths.new_zeros(1), kept_lengths.cumsum(0)])
    return Jagged(codes[keep], offsets, None if weights is None else weights[keep])


def encoded_features(schema: Schema, ids: Tensor, dense: Tensor, lists: list[Tensor]) -> Features:
    """The model's `Features` from encoded rows: ids `[N, S]`, scaled dense `[N, D]` and, flat in
    `lists`, each list feature's inputs as `list_input_names` names them."""
    jagged, parts = [], iter(lists)
    for f in schema.lists:
        codes, lengths = next(parts), next(parts)
        jagged.append(jagged_from_codes(codes, lengths, next(parts) if weighted(f) else None, f.max_length))
    return Features(ids, dense, tuple(jagged))


class ScoringCore(nn.Module):
    """Encoded inputs -> predictions `[N, L]` (`TaskSet.predict` of the logits, calibrated where a
    task asks for it: `mtlrec.calibration`): ids `[N, S]` int64, scaled dense `[N, D]`, and the
    list features' codes, lengths and weights (`encoded_features`), from which it builds the
    `Jagged` lists the model reads."""

    def __init__(self, trained: TrainedModel):
        super().__init__()
        self.model = trained.model.eval()
        self.schema = trained.schema
        self.tasks = TaskSet(self.schema)
        self.calibration = trained.calibration

    def forward(self, ids: Tensor, dense: Tensor, *lists: Tensor) -> Tensor:
        logits = self.model(encoded_features(self.schema, ids, dense, list(lists))).logits
        return self.tasks.predict(self.calibration(logits))


class InputList(nn.Module):
    """The core called with its inputs in one list, for TorchScript: a traced module takes no
    varying number of arguments, and a list it takes is never empty ([ids, dense, ...])."""

    def __init__(self, core: ScoringCore):
        super().__init__()
        self.core = core

    def forward(self, inputs: list[Tensor]) -> Tensor:
        return self.core(*inputs)


class RawScorer(nn.Module):
    """Raw values -> predictions, in TorchScript: vocabulary lookups, scaling, the core."""

    vocabs: list[dict[str, int]]  # per embedding table (annotated: TorchScript cannot type an empty list)
    singles: list[str]
    single_tables: list[int]
    list_names: list[str]
    list_tables: list[int]
    weighted: list[bool]

    def __init__(self, core: nn.Module, trained: TrainedModel):
        super().__init__()
        s = trained.schema
        tables = list(s.tables)
        self.core = core
        self.vocabs = _vocabs(trained)
        self.singles = [f.name for f in s.singles]
        self.single_tables = [tables.index(f.table) for f in s.singles]
        self.list_names = [f.name for f in s.lists]
        self.list_tables = [tables.index(f.table) for f in s.lists]
        self.weighted = [weighted(f) for f in s.lists]
        self.missing = MISSING  # TorchScript reads no global
        mean, std = _scaling(trained)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, sparse: dict[str, list[str]], dense: Tensor, lists: Optional[dict[str, list[list[str]]]] = None,
                weights: Optional[dict[str, list[list[float]]]] = None) -> Tensor:
        with torch.no_grad():
            return self._score(sparse, dense, lists, weights)

    def _score(self, sparse: dict[str, list[str]], dense: Tensor, lists: Optional[dict[str, list[list[str]]]],
               weights: Optional[dict[str, list[list[float]]]]) -> Tensor:
        n = dense.shape[0]
        ids = torch.zeros(n, len(self.singles), dtype=torch.long)
        for j, name in enumerate(self.singles):
            vocab = self.vocabs[self.single_tables[j]]
            values = sparse[name]
            if len(values) != n:
                raise ValueError("every sparse feature needs one value per row of dense")
            for i, value in enumerate(values):
                ids[i, j] = vocab.get(value, 0)
        encoded: list[Tensor] = []
        for k, name in enumerate(self.list_names):
            if lists is None or name not in lists:
                raise ValueError("every list feature needs its rows' lists in `lists`")
            rows = lists[name]
            if len(rows) != n:
                raise ValueError("every list feature needs one list per row of dense")
            vocab = self.vocabs[self.list_tables[k]]
            codes: list[int] = []
            for row in rows:
                for value in row:
                    codes.append(self.missing if value == "" else vocab.get(value, 0))
            encoded += [torch.tensor(codes, dtype=torch.long), torch.tensor([len(row) for row in rows], dtype=torch.long)]
            if self.weighted[k]:
                if weights is None or name not in weights:
                    raise ValueError("every list feature with element weights needs them in `weights`")
                row_weights = weights[name]
                if len(row_weights) != n or [len(w) for w in row_weights] != [len(row) for row in rows]:
                    raise ValueError("element weights need one weight per element of the lists")
                flat: list[float] = []
                for w in row_weights:
                    flat += w
                encoded.append(torch.tensor(flat, dtype=torch.float32))
        scaled = (dense - self.mean) / self.std
        return self.core([ids, torch.where(torch.isnan(scaled), torch.zeros_like(scaled), scaled)] + encoded)


def _check(trained: TrainedModel) -> None:
    hashed = [f.name for f in trained.schema.sparse if f.hash_buckets]
    if hashed:
        raise ValueError(f"cannot export hashed features {hashed}: give them a vocabulary (no hash_buckets)")


def _example(trained: TrainedModel) -> list[Tensor]:
    """Encoded inputs to trace with: 4 rows, lists of 2, 0, 3 and 1 elements."""
    s = trained.schema
    lengths = torch.tensor([2, 0, 3, 1])
    inputs = [torch.zeros(4, len(s.singles), dtype=torch.long), torch.zeros(4, len(s.dense))]
    for f in s.lists:
        inputs += [torch.zeros(6, dtype=torch.long), lengths] + ([torch.ones(6)] if weighted(f) else [])
    return inputs


def _vocabs(trained: TrainedModel) -> list[dict[str, int]]:
    """Category -> id (1..n) of each embedding table, in `schema.tables` order."""
    return [{v: i + 1 for i, v in enumerate(trained.encoder.vocabularies[name])} for name in trained.schema.tables]


def _scaling(trained: TrainedModel) -> tuple[Tensor, Tensor]:
    scalers = [trained.encoder.scalers[f.name] for f in trained.schema.dense]
    return (torch.tensor([m for m, _ in scalers], dtype=torch.float32),
            torch.tensor([s for _, s in scalers], dtype=torch.float32))


def export_torchscript(trained: TrainedModel, path: str | Path) -> Path:
    _check(trained)
    trained.model.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about shape checks on non-batch dimensions
        core = torch.jit.trace(InputList(ScoringCore(trained)), [_example(trained)], check_trace=False)
    scorer = torch.jit.script(RawScorer(core, trained))
    path = Path(path)
    scorer.save(str(path))
    return path


def export_onnx(trained: TrainedModel, path: str | Path) -> Path:
    import onnx
    from onnx import compose

    _check(trained)
    trained.model.cpu()
    s = trained.schema
    core_path = Path(path).with_suffix(".core.onnx")
    list_names = [name for f in s.lists for name in list_input_names(f)]
    rows = {0: "rows"}
    axes = {"ids": rows, "dense": rows, "predictions": rows}
    for f in s.lists:
        codes, lengths, *weights = list_input_names(f)
        axes |= {name: {0: f"{f.name} elements"} for name in [codes, *weights]} | {lengths: rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ScoringCore(trained), tuple(_example(trained)), str(core_path), input_names=["ids", "dense", *list_names],
            output_names=["predictions"], dynamo=False, dynamic_axes=axes,
        )
    core = onnx.load(str(core_path))
    core_path.unlink()
    pre, io_map = _encoding_graph(trained, {i.name for i in core.graph.input}, core)
    merged = compose.merge_models(pre, core, io_map=io_map)
    _order_inputs(merged.graph, [name for f in s.sparse for name in _raw_input_names(f)] + ["dense"])
    onnx.checker.check_model(merged)
    path = Path(path)
    onnx.save(merged, str(path))
    return path


def encoded_part(model, schema: Schema):
    """The part of an exported ONNX model from the encoded inputs on, as a model: `ids`,
    `dense_scaled` and the list features' `list_input_names` in, `predictions` out (what
    `ScoringCore` computes); the vocabulary lookups and the scaling cut off. (onnx's Extractor
    cannot cut it: it misses what embedding_bag's loops read from the graph around them.)"""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    boundary = [name for name in ("ids", "dense_scaled") if name in producer]
    boundary += [name for f in schema.lists for name in list_input_names(f)]
    encoding, stack = set(), [producer[name] for name in boundary if name in producer]
    while stack:
        i = stack.pop()
        if i not in encoding:
            encoding.add(i)
            stack += [producer[name] for name in graph.node[i].input if name in producer]
    nodes = [node for i, node in enumerate(graph.node) if i not in encoding]
    given = {i.name: i for i in graph.input}
    inputs = [given.get(name) or helper.make_tensor_value_info(
        name, TensorProto.FLOAT if name == "dense_scaled" else TensorProto.INT64, None) for name in boundary]
    read = names_read(nodes)
    part = helper.make_graph(nodes, graph.name, inputs, list(graph.output), [t for t in graph.initializer if t.name in read])
    return helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def names_read(nodes) -> set[str]:
    """The tensors the nodes read, their subgraphs' nodes included."""
    from onnx import AttributeProto

    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                names |= names_read(attribute.g.node)
            elif attribute.type == AttributeProto.GRAPHS:
                for g in attribute.graphs:
                    names |= names_read(g.node)
    return names


def _raw_input_names(feature: SparseFeature) -> list[str]:
    """A sparse feature's inputs in the exported ONNX graph."""
    if not feature.multi_valued:
        return [feature.name]
    return [feature.name, f"{feature.name}.lengths"] + ([f"{feature.name}.weights"] if weighted(feature) else [])


def _encoding_graph(trained: TrainedModel, core_inputs: set[str], core):
    """The ONNX graph from raw inputs to the core's encoded ones (vocabulary lookups, dense
    scaling) and its io_map onto the core. Lists' lengths and weights go to the core as they are."""
    from onnx import TensorProto, helper, numpy_helper

    s = trained.schema
    vocabs = dict(zip(s.tables, _vocabs(trained)))
    nodes, inputs, outputs, constants, io_map = [], [], [], [], []

    def lookup(name: str, output: str, vocab: dict[str, int], extra: dict[str, int]) -> None:
        keys = list(vocab) + list(extra) or ["\x00no vocabulary"]
        values = vocab | extra
        nodes.append(helper.make_node("LabelEncoder", [name], [output], domain="ai.onnx.ml", keys_strings=keys,
                                      values_int64s=[values.get(k, 0) for k in keys], default_int64=0))

    if "ids" in core_inputs:
        columns = []
        for j, feature in enumerate(s.singles):
            inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.STRING, ["rows"]))
            lookup(feature.name, f"id_{j}", vocabs[feature.table], {})
            nodes.append(helper.make_node("Unsqueeze", [f"id_{j}", "axis1"], [f"col_{j}"]))
            columns.append(f"col_{j}")
        constants.append(numpy_helper.from_array(torch.tensor([1]).numpy(), "axis1"))
        nodes.append(helper.make_node("Concat", columns, ["ids"], axis=1))
        outputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", len(s.singles)]))
        io_map.append(("ids", "ids"))
    for feature in s.lists:
        codes = f"{feature.name}.codes"
        inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.STRING, [f"{feature.name} elements"]))
        lookup(feature.name, codes, vocabs[feature.table], {"": MISSING})
        outputs.append(helper.make_tensor_value_info(codes, TensorProto.INT64, [f"{feature.name} elements"]))
        io_map.append((codes, codes))
    if "dense" in core_inputs:
        mean, std = _scaling(trained)
        inputs.append(helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["rows", len(s.dense)]))
        constants += [numpy_helper.from_array(mean.numpy(), "mean"), numpy_helper.from_array(std.numpy(), "std"),
                      numpy_helper.from_array(torch.zeros(1).numpy(), "zero")]
        nodes += [helper.make_node("Sub", ["dense", "mean"], ["centred"]),
                  helper.make_node("Div", ["centred", "std"], ["scaled"]),
                  helper.make_node("IsNaN", ["scaled"], ["missing"]),
                  helper.make_node("Where", ["missing", "zero", "scaled"], ["dense_scaled"])]
        outputs.append(helper.make_tensor_value_info("dense_scaled", TensorProto.FLOAT, ["rows", len(s.dense)]))
        io_map.append(("dense_scaled", "dense"))
    default_opset = next(o.version for o in core.opset_import if o.domain in ("", "ai.onnx"))
    pre = helper.make_model(helper.make_graph(nodes, "encode", inputs, outputs, constants),
                            opset_imports=[helper.make_opsetid("", default_opset), helper.make_opsetid("ai.onnx.ml", 3)])
    pre.ir_version = core.ir_version
    return pre, io_map


def _order_inputs(graph, order: list[str]) -> None:
    """Sort the graph's inputs by `order` (names not in it last, as they were)."""
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(graph.input, key=lambda i: rank.get(i.name, len(rank)))
    copies = [type(i)() for i in ordered]
    for copy, original in zip(copies, ordered):
        copy.CopyFrom(original)
    del graph.input[:]
    graph.input.extend(copies)
