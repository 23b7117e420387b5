"""Dynamic INT8 quantisation of an exported ONNX model, and what it changed.

`export_int8` exports a trained model with `mtlrec.export.export_onnx` and passes the file
through ONNX Runtime's dynamic quantiser (`onnxruntime.quantization.quantize_dynamic`):
weights are stored as 8-bit integers with one scale per tensor, and each product's input is
quantised batch by batch when the model runs (one scale per batch, from its range), so no
calibration data is needed. A row's prediction therefore depends slightly on the other rows
of its batch. What is quantised:

- the matrix products with a constant weight: the linear layers (`nn.Linear` exports as
  `Gemm`, which the quantiser rewrites as `MatMul` + `Add`) and the stacked experts' batched
  products. A product of two activations (a gate's weights times its experts' outputs)
  stays in float;
- but not the part of a layer that reads the dense features. One 8-bit scale cannot hold
  both embeddings (|x| ~ 0.1) and standardised dense values with long tails (census: up to
  61): quantised whole, census's first layer lost a quarter of its precision and the AUCs
  fell by 0.04 and 0.08. So a layer reading [embeddings, dense] is split in two products,
  x_e @ W_e in INT8 and x_d @ W_d in float (W's rows split alike); a layer whose input
  cannot be split that way stays in float;
- and not the last layer of each tower (the logits, or a regression task's value): its
  error is the prediction's, unsquashed for regression (0.3 on a predicted -2.5 in a
  small test model), for a saving of a few hundred bytes;
- with `embeddings=True`, also the embedding tables read by `Gather` (stored in 8 bits, one
  scale per table). It saves 3/4 of what the tables weigh: much for large vocabularies,
  little for small ones. A table that a list feature's pooling also reads (inside a loop)
  stays in float, with a warning;
- nothing else: the vocabulary lookups (`LabelEncoder`), the scaling of the dense features,
  the pooling of list features, batch norm (folded into the layers at export), the gates'
  softmax and the output activations stay as exported.

`agreement` compares an exported model's predictions with the trained model's own on a
labelled table: the largest difference per task and each task's metrics both ways.
Needs `pip install 'mtlrec[export]'`.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtlrec.export import names_read, encoded_part, export_onnx, list_input_names
from mtlrec.trained import TrainedModel

INT8_FILE = "model.int8.onnx"  # `mtlrec export MODEL --int8` writes MODEL/model.int8.onnx
DENSE = "dense_scaled"  # the scaled dense features in an export (`mtlrec.export`'s encoding graph)
WEIGHT_OPS = ("MatMul",)  # the quantiser's op for products with a constant weight (Gemm is rewritten to it)
EMBEDDING_OPS = ("Gather",)
PRODUCTS = frozenset({"MatMul", "Gemm"})
SHAPE_OPS = frozenset({"Shape", "Size"})  # their output is a shape, not the data
EIGHT_BIT = frozenset({2, 3})  # onnx.TensorProto.UINT8, INT8
FLOATING = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class Quantized:
    """What `quantize_onnx` wrote: the file, its size and the fp32 file's, how many weight
    values are stored in 8 bits and how many stayed in float (the graph's initializers), the
    products run on 8-bit integers and those left in float, how many layers were split to
    keep their dense-feature part in float, and the embedding tables stored in 8 bits."""

    path: Path
    fp32_bytes: int
    int8_bytes: int
    eight_bit_values: int
    float_values: int
    quantized_products: int
    float_products: int
    split_layers: int
    quantized_tables: int

    @property
    def size_ratio(self) -> float:
        """fp32 size / int8 size (4 at most)."""
        return self.fp32_bytes / self.int8_bytes

    def summary(self) -> str:
        """Sizes and what was quantised, in one line.

        >>> Quantized(Path("m.int8.onnx"), 4_000_000, 1_100_000, 900_000, 30_000, 9, 4, 2, 0).summary()
        'm.int8.onnx: 1.10 MB (fp32 4.00 MB, 3.64x smaller); 900,000 weights in 8 bits, 30,000 in float; 9 products in INT8, 4 in float (2 of them the dense-feature part of a layer); 0 embedding tables in 8 bits'
        """
        return (f"{self.path}: {self.int8_bytes / 1e6:.2f} MB (fp32 {self.fp32_bytes / 1e6:.2f} MB, "
                f"{self.size_ratio:.2f}x smaller); {self.eight_bit_values:,} weights in 8 bits, "
                f"{self.float_values:,} in float; {self.quantized_products} products in INT8, "
                f"{self.float_products} in float ({self.split_layers} of them the dense-feature part of a layer); "
                f"{self.quantized_tables} embedding tables in 8 bits")


def quantize_onnx(source: str | Path, target: str | Path, embeddings: bool = False) -> Quantized:
    """Quantise the ONNX file `source` (an `export_onnx` export) to dynamic INT8 in `target`.
    embeddings: also store the embedding tables in 8 bits. ValueError when the graph holds
    nothing to quantise."""
    onnx, _ = _onnx_packages()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    if target.exists() and source.resolve() == target.resolve():
        raise ValueError(f"the quantised model needs a path of its own, not {source}")
    model = onnx.load(str(source))
    _merge_opset_imports(model)
    split, keep_float = _keep_in_float(model)
    shared = _tables_read_elsewhere(model.graph) if embeddings else []
    ops = list(WEIGHT_OPS + (EMBEDDING_OPS if embeddings else ()))
    with _QuietQuantiser():
        quantize_dynamic(model, str(target), op_types_to_quantize=ops, nodes_to_exclude=keep_float + shared,
                         weight_type=QuantType.QInt8)
    quantized = onnx.load(str(target))
    result = Quantized(target, source.stat().st_size, target.stat().st_size, *_initializer_values(quantized),
                       sum(n.op_type == "MatMulInteger" for n in quantized.graph.node), len(keep_float), split,
                       _quantized_tables(quantized))
    if result.eight_bit_values == 0:
        target.unlink()
        raise ValueError(f"{source} holds no weight the dynamic quantiser can store in 8 bits")
    if shared:
        warnings.warn(f"{len(shared)} embedding lookup(s) left in float: their table is also read by a list "
                      "feature's pooling (inside a loop), which the quantiser does not reach", stacklevel=2)
    elif embeddings and result.quantized_tables == 0:
        warnings.warn("embeddings=True, but the graph has no embedding table to store in 8 bits", stacklevel=2)
    return result


def export_int8(trained: TrainedModel, path: str | Path, embeddings: bool = False) -> Quantized:
    """Export `trained` to ONNX (`export_onnx`) and write its dynamic INT8 quantisation to
    `path` (`quantize_onnx`); the fp32 export is a temporary file (its size is in the answer)."""
    with tempfile.TemporaryDirectory() as scratch:
        return quantize_onnx(export_onnx(trained, Path(scratch) / "model.onnx"), path, embeddings)


def _onnx_packages():
    """(onnx, onnxruntime), or an ImportError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"INT8 export needs onnx and onnxruntime ({err}): pip install 'mtlrec[export]'") from None
    return onnx, onnxruntime


def _merge_opset_imports(model) -> None:
    """One opset import per domain (the highest version): the exporter's merged graph may list
    the default domain twice, and the quantiser reads it only when it is listed once."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        versions[domain] = max(versions.get(domain, 0), opset.version)
    del model.opset_import[:]
    for domain, version in versions.items():
        entry = model.opset_import.add()
        entry.domain, entry.version = domain, version


def _keep_in_float(model) -> tuple[int, list[str]]:
    """Rewrite, in place, the products with a constant 2-D weight that are to stay in float
    (whole or in part) as MatMul nodes of their own, and return (the number of layers split,
    the names of the products to leave in float):

    - a product whose input carries the dense features (`DENSE`, through no other product):
      when the input is a concatenation of blocks on its last axis, as
      x @ W = x_e @ W_e + x_d @ W_d with the dense blocks (x_d) apart, the rest quantised;
      otherwise whole;
    - a product whose result reaches the outputs through no other product (a tower's last
      layer: its error would be the prediction's, unsquashed for a regression task).

    A Gemm's bias follows as an Add."""
    from onnx import numpy_helper, shape_inference

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    shapes = _shapes(shape_inference.infer_shapes(model).graph)
    producer = {name: node for node in graph.node for name in node.output}
    dense = _carrying(graph, DENSE)
    last = _feeding(graph)
    nodes, keep_float, split = [], [], 0
    for node in graph.node:
        weight = _product_weight(node, weights)
        if weight is None or (node.input[0] not in dense and node.output[0] not in last):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[weight[0]])
        w = w.T if weight[1] else w
        blocks = _blocks(producer.get(node.input[0]), shapes, w.shape[0]) or []
        embedded = [(name, rows) for name, rows in blocks if name not in dense]
        carried = [(name, rows) for name, rows in blocks if name in dense]
        if embedded and carried and node.output[0] not in last:
            split += 1
            parts = {"embedded": embedded, "dense": carried}
        else:
            parts = {"float": [(node.input[0], np.arange(w.shape[0]))]}
        keep_float.append(f"{node.output[0]}/{'dense' if 'dense' in parts else 'float'}")
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        nodes += _products(node.output[0], w, parts, bias, graph.initializer)
    del graph.node[:]
    graph.node.extend(_without_unread(nodes, graph))
    read = names_read(graph.node) | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return split, keep_float


def _products(output: str, w: np.ndarray, parts: dict[str, list[tuple[str, np.ndarray]]], bias: str | None,
              initializers) -> list:
    """Nodes computing `output` = sum over parts of (the part's blocks) @ (their rows of w)
    (+ bias). Each part's product is named `output/label` (tensor names are unique in a graph,
    node names need not be), its weight rows added to `initializers`."""
    from onnx import helper, numpy_helper

    nodes, products = [], []
    for label, blocks in parts.items():
        name = f"{output}/{label}"
        x = blocks[0][0]
        if len(blocks) > 1:
            x = f"{name}/input"
            nodes.append(helper.make_node("Concat", [b for b, _ in blocks], [x], name=f"{name}/concat", axis=-1))
        rows = np.concatenate([rows for _, rows in blocks])
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(w[rows]), f"{name}/weight"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}/weight"], [f"{name}/output"], name=name))
        products.append(f"{name}/output")
    total = f"{output}/sum" if bias else output
    if len(products) > 1:
        nodes.append(helper.make_node("Add", products, [total], name=total))
    else:
        nodes[-1].output[0] = total
    if bias:
        nodes.append(helper.make_node("Add", [total, bias], [output], name=f"{output}/bias"))
    return nodes


def _product_weight(node, weights: dict) -> tuple[str, bool] | None:
    """(the constant 2-D weight's name, whether it is transposed) of a plain MatMul or Gemm
    (alpha = beta = 1, A not transposed) whose weight is an initializer; None for any other node."""
    from onnx import helper

    if node.op_type not in PRODUCTS or len(node.input) < 2 or node.input[1] not in weights:
        return None
    if len(weights[node.input[1]].dims) != 2:
        return None
    options = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if options.get("transA", 0) or options.get("alpha", 1.0) != 1.0 or options.get("beta", 1.0) != 1.0:
        return None
    return node.input[1], bool(options.get("transB", 0))


def _carrying(graph, source: str) -> set[str]:
    """The tensors computed from `source` through no matrix product (and not its shape only)."""
    carried = {source}
    for node in graph.node:  # in topological order, as ONNX keeps them
        if node.op_type not in PRODUCTS | SHAPE_OPS and carried.intersection(node.input):
            carried.update(node.output)
    return carried


def _tables_read_elsewhere(graph) -> list[str]:
    """The Gather nodes whose table (an initializer) other nodes read too, subgraphs included:
    quantising them would add an 8-bit copy and keep the float table."""
    tables = {t.name for t in graph.initializer}
    elsewhere = names_read([n for n in graph.node if n.op_type != "Gather"])
    return [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in tables & elsewhere]


def _feeding(graph) -> set[str]:
    """The tensors the graph's outputs are computed from through no matrix product (shapes aside)."""
    feeding = {o.name for o in graph.output}
    for node in reversed(graph.node):
        if node.op_type not in PRODUCTS | SHAPE_OPS and feeding.intersection(node.output):
            feeding.update(node.input)
    return feeding


def _shapes(graph) -> dict[str, tuple[int, int | None]]:
    """Tensor name -> (rank, size of the last axis or None), where shape inference knows the rank."""
    shapes = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims = tensor.shape.dim
            shapes[value.name] = (len(dims), dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None)
    return shapes


def _blocks(concat, shapes: dict, rows: int) -> list[tuple[str, np.ndarray]] | None:
    """The blocks a product's input is concatenated from, each with its rows of the weight
    (`rows` in all): None unless the input is a Concat on the last axis whose blocks' widths
    are known, save one, which the rest determine."""
    if concat is None or concat.op_type != "Concat" or any(name not in shapes for name in concat.input):
        return None
    ranks = {shapes[name][0] for name in concat.input}
    axis = next(a.i for a in concat.attribute if a.name == "axis")
    widths = [shapes[name][1] for name in concat.input]
    if len(ranks) != 1 or axis not in (-1, ranks.pop() - 1) or widths.count(None) > 1:
        return None
    rest = rows - sum(w for w in widths if w is not None)
    if rest < 0 or (None not in widths and rest != 0):
        return None
    sizes = [rest if w is None else w for w in widths]
    ends = np.cumsum(sizes)
    return [(name, np.arange(end - size, end)) for name, size, end in zip(concat.input, sizes, ends)]


def _without_unread(nodes: list, graph) -> list:
    """`nodes` less those whose outputs nothing reads (a Concat all of whose readers were split)."""
    read = names_read(nodes) | {o.name for o in graph.output}
    return [n for n in nodes if n.op_type != "Concat" or any(o in read for o in n.output)]


class _QuietQuantiser:
    """Drop the quantiser's advice to run its pre-processing (symbolic shape inference and
    graph optimisation, for graphs whose shapes it cannot infer: these it can), and nothing else."""

    ADVICE = "Please consider to run pre-processing"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.ADVICE)

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _initializer_values(model) -> tuple[int, int]:
    """(values in 8-bit initializers, values in floating-point ones)."""
    eight, floating = 0, 0
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        eight += size if tensor.data_type in EIGHT_BIT else 0
        floating += size if tensor.data_type in FLOATING else 0
    return eight, floating


def _quantized_tables(model) -> int:
    """Gather nodes reading an 8-bit initializer: the embedding tables stored in 8 bits."""
    eight_bit = {t.name for t in model.graph.initializer if t.data_type in EIGHT_BIT}
    return sum(n.op_type == "Gather" and n.input[0] in eight_bit for n in model.graph.node)


@dataclass(frozen=True)
class Agreement:
    """An exported model against the trained model's own predictions on a labelled table:
    `max_difference` per task (largest |exported - trained| over the rows) and every task
    metric both ways (`TaskSet.metrics` names)."""

    rows: int
    max_difference: dict[str, float]
    trained_metrics: dict[str, float]
    exported_metrics: dict[str, float]

    @property
    def metric_change(self) -> dict[str, float]:
        """Exported minus trained, per metric."""
        return {k: self.exported_metrics[k] - v for k, v in self.trained_metrics.items()}

    def describe(self) -> str:
        """The largest differences, then a table of the metrics: trained, exported, change.

        >>> print(Agreement(100, {"click": 0.002}, {"auc/click": 0.75}, {"auc/click": 0.7499}).describe())
        largest |export - trained| over 100 rows: click 0.002
           metric  trained   export    change
        auc/click 0.750000 0.749900 -0.000100
        """
        table = pd.DataFrame({"metric": list(self.trained_metrics), "trained": list(self.trained_metrics.values()),
                              "export": [self.exported_metrics[k] for k in self.trained_metrics],
                              "change": list(self.metric_change.values())})
        largest = ", ".join(f"{task} {value:.3g}" for task, value in self.max_difference.items())
        return (f"largest |export - trained| over {self.rows:,} rows: {largest}\n"
                + table.to_string(index=False, float_format="%.6f"))


def agreement(trained: TrainedModel, onnx_path: str | Path, table: pd.DataFrame, batch_size: int = 8192) -> Agreement:
    """Score the labelled `table` with the ONNX file (its part after the vocabulary lookups,
    fed the encoder's ids, so any feature kind reads as in training) and with `trained`, and
    compare them."""
    onnx, onnxruntime = _onnx_packages()
    data = trained.encoder.transform(table)
    expected = trained.tasks.predict(trained.outputs(data, batch_size)[0]).numpy()
    core = encoded_part(onnx.load(str(onnx_path)), trained.schema)
    session = onnxruntime.InferenceSession(core.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    parts = []
    for batch in data.batches(batch_size):
        feed = {"ids": batch.sparse.numpy(), DENSE: batch.dense.numpy()}
        for feature, jagged in zip(trained.schema.lists, batch.lists):
            codes, lengths, *weights = list_input_names(feature)
            feed |= {codes: jagged.values.numpy(), lengths: jagged.lengths.numpy()}
            feed |= {weights[0]: jagged.weights.numpy()} if weights else {}
        parts.append(session.run(["predictions"], {k: v for k, v in feed.items() if k in wanted})[0])
    got = np.concatenate(parts)
    labels, mask = data.labels.numpy(), data.mask.numpy()
    weights = data.weights.numpy() if trained.tasks.weighted_metrics and data.weights is not None else None
    names = trained.tasks.output_names  # one per prediction column (a multiclass task has one per class)
    return Agreement(len(table), dict(zip(names, np.abs(got - expected).max(axis=0).tolist())),
                     trained.tasks.metrics(expected, labels, mask, weights),
                     trained.tasks.metrics(got, labels, mask, weights))
