"""The embedding layer on TorchRec: `FeatureEmbedding`'s inputs and outputs, TorchRec's tables.

`keyed` hands a batch's sparse features to TorchRec as one `KeyedJaggedTensor`;
`TorchRecEmbedding` is a drop-in for `FeatureEmbedding` whose tables are TorchRec modules,
one table per `Schema.tables` entry, so that TorchRec's sharding (`DistributedModelParallel`)
and fbgemm's fused kernels apply to them.

- Single ids and sum / mean lists go through one `EmbeddingBagCollection` (or, with
  `fused_optimizer`, a `FusedEmbeddingBagCollection`: fbgemm's table-batched kernel with the
  optimizer applied inside backward). Every bag table pools by SUM and the mean's divisor
  (the list's length, or its weights' sum) is applied afterwards, because TorchRec's pooling
  is per table (a table shared by a sum list and a mean list would conflict) and its MEAN with
  element weights is not ours (`nn.EmbeddingBag` refuses weights with mean; fbgemm's kernel
  divides sum_i w_i e_i by the length, not by sum_i w_i).
- Tables read by a max or attention list are looked up unpooled by an `EmbeddingCollection`
  (one per embedding size, which TorchRec requires) and pooled by `mtlrec.nn.pooling`, every
  feature of such a table included, so a shared table stays one parameter.

TorchRec is optional: this module imports without it, and building a `TorchRecEmbedding`
or calling `keyed` without it raises an ImportError saying how to install it.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtlrec.data.features import Features, Jagged
from mtlrec.nn.embedding import FeatureEmbedding
from mtlrec.nn.pooling import AttentionPooling, pool
from mtlrec.schema import Schema

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor

INIT = partial(nn.init.normal_, std=0.01)  # FeatureEmbedding's; in the configs, so a sharded table starts so too
UNPOOLED = ("max", "attention")  # list poolings TorchRec has no bag for: EmbeddingCollection + mtlrec.nn.pooling


def torchrec_available() -> bool:
    """Whether TorchRec imports (and with it fbgemm's kernels)."""
    try:
        _torchrec()
    except ImportError:
        return False
    return True


def _torchrec() -> Any:
    try:
        import torchrec
    except ImportError as err:
        raise ImportError(
            "the TorchRec embedding needs TorchRec: pip install 'mtlrec[torchrec]', then "
            "pip install --no-deps torchrec==1.8.0 (see pyproject.toml)"
        ) from err
    return torchrec


def keyed(features: Features, schema: Schema, weighted: bool | None = None) -> KeyedJaggedTensor:
    """A batch's sparse features as one `KeyedJaggedTensor`, the input of TorchRec's modules.

    Keys: the single-valued features in schema order (the columns of `ids`), then the lists in
    schema order, i.e. `schema.singles + schema.lists`. A single id is a list of length 1;
    a list keeps its `Jagged` values and lengths. No loop over rows.

    Args:
        features: ids `[B, S]`, one `Jagged` per list (dense values are not read).
        schema: the schema the batch was encoded with.
        weighted: give the KJT weights: each list's element weights, 1 for every element of a
            feature without any. None: weights exactly when some list carries them.

    Returns:
        KeyedJaggedTensor with stride B, values `[S * B + sum_l V_l]` int64, lengths
        `[(S + L) * B]`, weights `[same as values]` float32 or None.

    Example:
        >>> import torch
        >>> from mtlrec.data.features import Features, Jagged
        >>> from mtlrec.schema import Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="user", vocab_size=50),
        ...                         SparseFeature(name="tags", vocab_size=9, multi_valued=True)],
        ...                 tasks=[Task(name="click")])
        >>> kjt = keyed(Features(torch.tensor([[4], [7]]), torch.zeros(2, 0), (Jagged.from_lists([[1, 2], []]),)), schema)
        >>> kjt.keys(), kjt.values().tolist(), kjt.lengths().tolist()
        (['user', 'tags'], [4, 7, 1, 2], [1, 1, 2, 0])
    """
    trec = _torchrec()
    ids, _, lists = features
    batch, singles = ids.shape
    if singles != len(schema.singles) or len(lists) != len(schema.lists):
        raise ValueError(f"the batch has {singles} single-id columns and {len(lists)} lists; the schema "
                         f"{len(schema.singles)} and {len(schema.lists)}")
    if weighted is None:
        weighted = any(j.weights is not None for j in lists)
    weights = None
    if weighted:
        ones = [torch.ones(batch * singles, device=ids.device)]
        weights = torch.cat(ones + [torch.ones(j.values.shape[0], device=ids.device) if j.weights is None
                                    else j.weights.float() for j in lists])
    return trec.KeyedJaggedTensor(
        keys=[f.name for f in schema.singles] + [f.name for f in schema.lists],
        values=torch.cat([ids.t().reshape(-1)] + [j.values for j in lists]),
        weights=weights,
        lengths=torch.cat([ids.new_ones(batch * singles)] + [j.lengths for j in lists]),
        stride=batch,
        length_per_key=[batch] * singles + [j.values.shape[0] for j in lists],
    )


def mean_from_sum(summed: Tensor, lists: Jagged) -> Tensor:
    """`[N, d]` sum-pooled rows (weighted where `lists` has weights) -> the mean of
    `mtlrec.nn.pooling.pool`: divided by the row's weight total (its length without weights),
    zero (with zero gradient) where that total is zero."""
    if lists.weights is None:
        total = lists.lengths.to(summed.dtype)
    else:
        total = torch.segment_reduce(lists.weights.double(), "sum", offsets=lists.offsets).to(summed.dtype)
    nonzero = total != 0
    return summed * (nonzero / torch.where(nonzero, total, 1.0))[:, None]


class TorchRecEmbedding(nn.Module):
    """`FeatureEmbedding` on TorchRec's tables: the same call, output and `out_dim`.

    One TorchRec table per `Schema.tables` entry (named after it, `feature_names` = the
    features reading it, so a shared table is one parameter). Single ids and sum / mean lists
    pool in an `EmbeddingBagCollection` (SUM tables, the mean divided afterwards); tables read
    by a max or attention list are looked up in an `EmbeddingCollection` and pooled by
    `mtlrec.nn.pooling`. `load_from` / `copy_to` move the weights from / to a
    `FeatureEmbedding` of the same schema. Under `DistributedModelParallel` the forward runs
    unchanged on the sharded bag collection (tested on one process, table-wise, fused kernel);
    a sharded module's weights load through its `state_dict`, not `load_from`.

    Args:
        schema: the features (every sparse feature needs its vocab_size).
        fused_optimizer: None (tables train with the model's optimizer), or `(optimizer class,
            kwargs)`, e.g. `(torch.optim.Adagrad, {"lr": 0.01})`: the bag tables are a
            `FusedEmbeddingBagCollection` (fbgemm TBE) that updates them inside backward, so they
            get no `.grad`. On CPU fbgemm takes SGD, Adagrad and torchrec.optim.RowWiseAdagrad (Adam
            only on CUDA); give Adagrad torch's eps (1e-10) to match torch, fbgemm's default is 1e-8.
            Embedding sizes must be multiples of 4. Tables of max / attention lists are not fused.
        device: where the tables live (the fused kernel places them at construction).

    Call Args:
        features: `Features` with ids `[B, S]`, dense `[B, D]`, one `Jagged` per list.

    Returns:
        `[B, out_dim]`: the single ids' embeddings grouped by embedding size (schema order within
        a size), then the pooled lists (schema order), the dense values last.

    Example:
        >>> import torch
        >>> from mtlrec.data.features import Features, Jagged
        >>> from mtlrec.nn.embedding import FeatureEmbedding
        >>> from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="user", vocab_size=50, embedding_dim=4),
        ...                         SparseFeature(name="item", vocab_size=90, embedding_dim=4),
        ...                         SparseFeature(name="seen", vocab_size=90, embedding_dim=4,
        ...                                       embedding="item", multi_valued=True, pooling="sum")],
        ...                 dense=[DenseFeature(name="age")], tasks=[Task(name="click")])
        >>> plain, embed = FeatureEmbedding(schema), TorchRecEmbedding(schema)
        >>> embed.load_from(plain)
        >>> batch = Features(torch.tensor([[1, 7], [49, 0]]), torch.tensor([[0.5], [-1.0]]),
        ...                  (Jagged.from_lists([[7, 8], []]),))
        >>> x = embed(batch)
        >>> x.shape, embed.out_dim, sorted(embed.table_weights())
        (torch.Size([2, 13]), 13, ['item', 'user'])
        >>> torch.allclose(x, plain(batch), atol=1e-6)
        True
    """

    def __init__(self, schema: Schema, fused_optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        trec = _torchrec()
        schema.require_vocab()
        if schema.sequences:  # the config refuses this too; this is for callers who build the layer themselves
            raise ValueError(f"lists {[f.name for f in schema.sequences]} have pooling: none (kept as sequences), "
                             "which TorchRec's tables do not hand on: use mtlrec.nn.FeatureEmbedding")
        self.schema = schema
        self.num_dense = len(schema.dense)
        self.weighted = any(f.weights or f.weight_separator for f in schema.lists)
        device = torch.device(device) if device is not None else None
        tables = schema.tables
        dotted = [name for name in tables if "." in name]
        if dotted:
            raise ValueError(f"TorchRec names a module after each table; table names may not contain '.': {dotted}")
        unpooled = {name for name, members in tables.items() if any(f.pooling in UNPOOLED for f in members)}
        bags = [trec.EmbeddingBagConfig(num_embeddings=m[0].vocab_size, embedding_dim=m[0].embedding_dim, name=name,
                                        feature_names=[f.name for f in m], pooling=trec.PoolingType.SUM, init_fn=INIT)
                for name, m in tables.items() if name not in unpooled]
        self.pooled = self._bag_collection(bags, fused_optimizer, device) if bags else None
        dims = sorted({tables[name][0].embedding_dim for name in unpooled})
        self.unpooled = nn.ModuleDict({
            str(dim): trec.EmbeddingCollection([
                trec.EmbeddingConfig(num_embeddings=m[0].vocab_size, embedding_dim=dim, name=name,
                                     feature_names=[f.name for f in m], init_fn=INIT)
                for name, m in tables.items() if name in unpooled and m[0].embedding_dim == dim], device=device)
            for dim in dims
        })
        self.unpooled_features = {f.name for name in unpooled for f in tables[name]}
        self.attention = nn.ModuleDict({
            str(k): AttentionPooling(f.embedding_dim, f.max_length, f.attention)
            for k, f in enumerate(schema.lists) if f.attention is not None
        })
        self.singles_order = [f.name for f in sorted(schema.singles, key=lambda f: f.embedding_dim)]
        self.out_dim = sum(f.embedding_dim for f in schema.sparse) + self.num_dense
        self.reset_parameters()

    def _bag_collection(self, bags: list, fused_optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None,
                        device: torch.device | None) -> nn.Module:
        """An EmbeddingBagCollection of `bags`, or with `fused_optimizer` a FusedEmbeddingBagCollection."""
        if fused_optimizer is None:
            return _torchrec().EmbeddingBagCollection(bags, is_weighted=self.weighted, device=device)
        from torchrec.modules import fused_embedding_modules

        odd = [c.name for c in bags if c.embedding_dim % 4]
        if odd:
            raise ValueError(f"the fused kernel (fbgemm TBE) needs embedding sizes that are multiples of 4; tables "
                             f"{odd} are not")
        optimizer, options = fused_optimizer
        return fused_embedding_modules.FusedEmbeddingBagCollection(
            bags, optimizer_type=optimizer, optimizer_kwargs=options, is_weighted=self.weighted, device=device)

    def reset_parameters(self) -> None:
        """Every table drawn from N(0, 0.01^2), as `FeatureEmbedding` initialises its tables (the fused
        kernel draws its own; DistributedModelParallel draws from the configs' `init_fn`, the same)."""
        with torch.no_grad():
            for weight in self.table_weights().values():
                INIT(weight)

    def table_weights(self) -> dict[str, Tensor]:
        """Table name -> its weight `[vocab_size, embedding_dim]` (the parameter itself)."""
        out: dict[str, Tensor] = {}
        if self.pooled is not None:
            out.update((name, bag.weight) for name, bag in self.pooled.embedding_bags.items())
        for collection in self.unpooled.values():
            out.update((name, embedding.weight) for name, embedding in collection.embeddings.items())
        return out

    def table_keys(self) -> dict[str, str]:
        """Table name -> the key of its weight in this module's state dict."""
        keys = {id(value): key for key, value in self.state_dict(keep_vars=True).items()}
        return {name: keys[id(weight)] for name, weight in self.table_weights().items()}

    def forward(self, features: Features) -> Tensor:
        lists = features.lists
        if not self.weighted and any(j.weights is not None for j in lists):
            carrying = [f.name for f, j in zip(self.schema.lists, lists) if j.weights is not None]
            raise ValueError(f"lists {carrying} carry element weights but the schema gives none (weights / "
                             "weight_separator), so the TorchRec tables were built unweighted")
        kjt = keyed(features, self.schema, weighted=self.weighted)
        vectors: dict[str, Tensor] = self.pooled(kjt).to_dict() if self.pooled is not None else {}
        rows = {name: jt.values() for collection in self.unpooled.values() for name, jt in collection(kjt).items()}
        vectors.update((f.name, rows[f.name]) for f in self.schema.singles if f.name in rows)  # one row each: [B, d]
        parts = [vectors[name] for name in self.singles_order]
        for k, (f, jagged) in enumerate(zip(self.schema.lists, lists)):
            if f.name not in self.unpooled_features:
                summed = vectors[f.name]
                parts.append(mean_from_sum(summed, jagged) if f.pooling == "mean" else summed)
                continue
            looked_up = rows[f.name]  # [V, d]: pooled by mtlrec.nn.pooling over its own rows
            position = torch.arange(looked_up.shape[0], device=looked_up.device)
            if f.pooling == "attention":
                parts.append(self.attention[str(k)](looked_up, position, jagged, vectors[f.attention.target]))
            else:
                parts.append(pool(looked_up, position, jagged.offsets, f.pooling, jagged.weights))
        if self.num_dense:
            parts.append(features.dense)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _pairs(self, plain: FeatureEmbedding) -> list[tuple[Tensor, Tensor]]:
        """(this module's table, the rows of `plain` holding the same table) for every table."""
        if plain.out_dim != self.out_dim or len(plain.lists) != len(self.schema.lists):
            raise ValueError("the FeatureEmbedding was built for another schema")
        mine = self.table_weights()
        return [(mine[name], plain.tables[i].weight[rows]) for name, (i, rows) in plain_layout(plain, self.schema).items()]

    @torch.no_grad()
    def load_from(self, plain: FeatureEmbedding) -> None:
        """Copy a `FeatureEmbedding`'s tables (and attention MLPs) of the same schema into this one."""
        for mine, theirs in self._pairs(plain):
            mine.copy_(theirs)
        self.attention.load_state_dict(plain.attention.state_dict())

    def state_from(self, plain: FeatureEmbedding) -> dict[str, Tensor]:
        """This module's state dict filled from a `FeatureEmbedding` of the same schema, the tables
        as views of `plain`'s rows (no copy). For a module built on the meta device, whose
        storage `DistributedModelParallel` allocates shard by shard: loading this state gives
        each process its rows without a second whole copy of the tables."""
        layout = plain_layout(plain, self.schema)
        state = {key: plain.tables[layout[name][0]].weight.detach()[layout[name][1]]
                 for name, key in self.table_keys().items()}
        state.update((f"attention.{key}", value) for key, value in plain.attention.state_dict().items())
        return state

    @torch.no_grad()
    def copy_to(self, plain: FeatureEmbedding) -> None:
        """Copy this module's tables (and attention MLPs) into a `FeatureEmbedding` of the same schema
        (e.g. to export or serve a model trained on TorchRec)."""
        for mine, theirs in self._pairs(plain):
            theirs.copy_(mine)
        plain.attention.load_state_dict(self.attention.state_dict())


def plain_layout(plain: FeatureEmbedding, schema: Schema) -> dict[str, tuple[int, slice]]:
    """Where `FeatureEmbedding` keeps each table: table name -> (index into `plain.tables`,
    its rows there), read off the module's own layout (the row offset of each feature).

    Example: `plain.tables[i].weight[rows]` is table `name`'s `[vocab_size, embedding_dim]`.
    """
    first: dict[str, tuple[int, int]] = {}
    singles = schema.singles
    for i in plain.single_groups:
        columns, offsets = getattr(plain, f"columns_{i}").tolist(), getattr(plain, f"offsets_{i}").tolist()
        first.update((singles[c].table, (i, row)) for c, row in zip(columns, offsets))
    first.update((f.table, place) for f, (place, _) in zip(schema.lists, plain.lists))
    tables = schema.tables
    return {name: (i, slice(row, row + tables[name][0].vocab_size)) for name, (i, row) in first.items()}


__all__ = ["TorchRecEmbedding", "keyed", "mean_from_sum", "plain_layout", "torchrec_available"]
