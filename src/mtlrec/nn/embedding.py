"""Turns a batch's features (single ids, id lists, dense values) into one input vector per row,
and hands on the lists kept as sequences (`pooling: none`) padded, for the sequence encoder."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.nn.pooling import AttentionPooling, padded_rows, pool
from mtlrec.nn.sequence import PaddedSequence
from mtlrec.schema import Schema


class FeatureEmbedding(nn.Module):
    """Embeds every sparse feature, pools every list, and appends the dense values.

    Tables of equal embedding size are stored as one parameter, each table owning a slice of
    its rows (an id offset), so a batch needs one lookup per distinct size for all single ids.
    Features naming one table (`SparseFeature.embedding`) read the same rows: one parameter
    and one vocabulary. Lists are pooled per feature (`mtlrec.nn.pooling`).

    Call args: `Features` with ids `[B, S]` (int64, feature f in `[0, vocab_size_f)`), dense
    `[B, D]`, one `Jagged` per multi-valued feature.
    Returns: `[B, out_dim]`, out_dim = sum of embedding sizes + D: the single ids' embeddings
    grouped by embedding size (schema order within a size), then the pooled lists (schema
    order), the dense values last. Lists with `pooling: none` are not in it: `sequences`
    hands them on.

    Example:
        >>> import torch
        >>> from mtlrec.data.features import Features, Jagged
        >>> from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="user", vocab_size=50, embedding_dim=4),
        ...                         SparseFeature(name="item", vocab_size=90, embedding_dim=4),
        ...                         SparseFeature(name="seen", vocab_size=90, embedding_dim=4,
        ...                                       embedding="item", multi_valued=True, pooling="sum")],
        ...                 dense=[DenseFeature(name="age")], tasks=[Task(name="click")])
        >>> embed = FeatureEmbedding(schema)
        >>> seen = Jagged.from_lists([[7, 8], []])
        >>> x = embed(Features(torch.tensor([[1, 7], [49, 0]]), torch.tensor([[0.5], [-1.0]]), (seen,)))
        >>> x.shape, embed.out_dim
        (torch.Size([2, 13]), 13)
        >>> torch.equal(x[:, 4:8], embed.tables[0].weight[50 + torch.tensor([7, 0])])  # item after user
        True
        >>> torch.allclose(x[0, 8:12], embed.tables[0].weight[50 + 7] + embed.tables[0].weight[50 + 8])
        True
    """

    def __init__(self, schema: Schema):
        super().__init__()
        schema.require_vocab()
        self.num_dense = len(schema.dense)
        tables = schema.tables
        dims = sorted({f.embedding_dim for f in schema.sparse})
        self.tables = nn.ModuleList()
        where: dict[str, tuple[int, int]] = {}  # table name -> (parameter, first row)
        self.single_groups: list[int] = []  # parameters that single ids read
        for i, dim in enumerate(dims):
            names = [name for name, members in tables.items() if members[0].embedding_dim == dim]
            first_row = 0
            for name in names:
                where[name] = (i, first_row)
                first_row += tables[name][0].vocab_size
            table = nn.Embedding(first_row, dim)
            nn.init.normal_(table.weight, std=0.01)
            self.tables.append(table)
            members = [j for j, f in enumerate(schema.singles) if f.embedding_dim == dim]
            if members:
                self.single_groups.append(i)
                offsets = torch.tensor([where[schema.singles[j].table][1] for j in members])
                self.register_buffer(f"columns_{i}", torch.tensor(members), persistent=False)
                self.register_buffer(f"offsets_{i}", offsets, persistent=False)
        singles = [f.name for f in schema.singles]
        self.lists = [(where[f.table], f.pooling) for f in schema.lists]
        by_name = {f.name: f for f in schema.sparse}
        # attention and sequence targets: (the target's column in ids, the first row of the target's table)
        self.targets = [(singles.index(f.target), where[by_name[f.target].table][1]) if f.target else None
                        for f in schema.lists]
        self.sequence_lists = [(k, f.max_length) for k, f in enumerate(schema.lists) if f.pooling == "none"]
        self.attention = nn.ModuleDict({
            str(k): AttentionPooling(f.embedding_dim, f.max_length, f.attention)
            for k, f in enumerate(schema.lists) if f.attention is not None
        })
        pooled = [f for f in schema.lists if f.pooling != "none"]
        self.out_dim = sum(f.embedding_dim for f in [*schema.singles, *pooled]) + self.num_dense
        # each feature's output columns in the layout forward returns (for feature_columns), schema order
        layout = [(f.name, f.embedding_dim) for dim in dims for f in schema.singles if f.embedding_dim == dim]
        layout += [(f.name, f.embedding_dim) for f in pooled] + [(f.name, 1) for f in schema.dense]
        starts = accumulate((width for _, width in layout), initial=0)
        where = {name: range(start, start + width) for (name, width), start in zip(layout, starts)}
        self._columns_by_feature: dict[str, range] = {  # schema order
            f.name: where[f.name] for f in [*schema.sparse, *schema.dense] if f.name in where}
        self._sequence_names = [f.name for f in schema.sequences]

    def feature_columns(self, names: Sequence[str]) -> Tensor:
        """The output columns (int64 `[sum of the features' widths]`) holding features `names`,
        in the order given: a sparse feature's embedding_dim columns, a dense feature's one.
        ValueError naming any name that is not a feature.

        Example:
            >>> from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task
            >>> schema = Schema(sparse=[SparseFeature(name="user", vocab_size=9, embedding_dim=3),
            ...                         SparseFeature(name="item", vocab_size=9, embedding_dim=2)],
            ...                 dense=[DenseFeature(name="age")], tasks=[Task(name="click")])
            >>> FeatureEmbedding(schema).feature_columns(["user", "age"])  # item (size 2) comes first
            tensor([2, 3, 4, 5])
        """
        sequences = [name for name in names if name in self._sequence_names]
        if sequences:
            raise ValueError(f"feature(s) {sequences} have pooling: none: they are sequences, read by the model's "
                             "sequence_encoder, not columns of the embedded row")
        unknown = [name for name in names if name not in self._columns_by_feature]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; features: {list(self._columns_by_feature)}")
        return torch.tensor([c for name in names for c in self._columns_by_feature[name]], dtype=torch.long)

    def forward(self, features: Features) -> Tensor:
        ids, dense, lists = features
        parts = []
        for i in self.single_groups:
            columns = getattr(self, f"columns_{i}")
            grouped = ids.index_select(1, columns) + getattr(self, f"offsets_{i}")
            # index_select is table(ids) with a backward (index_add) over twice as fast on CPU
            parts.append(self.tables[i].weight.index_select(0, grouped.reshape(-1)).view(grouped.shape[0], -1))
        for k, (((i, first_row), mode), values) in enumerate(zip(self.lists, lists)):
            table = self.tables[i].weight
            if mode == "attention":
                query = self._target(k, ids)
                parts.append(self.attention[str(k)](table, values.values + first_row, values, query))
            elif mode != "none":  # none: handed on by `sequences`
                parts.append(pool(table, values.values + first_row, values.offsets, mode, values.weights))
        if self.num_dense or not parts:  # no part at all (only sequences): dense is [B, 0]
            parts.append(dense)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def sequences(self, features: Features) -> list[PaddedSequence]:
        """The lists with `pooling: none`, schema order, each as a `PaddedSequence`: items
        `[B, max_length, d]` (oldest first, left-aligned, zero rows after the elements), mask
        `[B, max_length]`, and the embedding `[B, d]` of its sequence_target (or None).

        Example:
            >>> import torch
            >>> from mtlrec.data.features import Features, Jagged
            >>> from mtlrec.schema import Schema, SparseFeature, Task
            >>> schema = Schema(sparse=[SparseFeature(name="item", vocab_size=90, embedding_dim=4),
            ...                         SparseFeature(name="seen", embedding="item", vocab_size=90, embedding_dim=4,
            ...                                       multi_valued=True, max_length=3, pooling="none",
            ...                                       sequence_target="item")], tasks=[Task(name="click")])
            >>> embed = FeatureEmbedding(schema)
            >>> batch = Features(torch.tensor([[7], [9]]), torch.zeros(2, 0), (Jagged.from_lists([[7, 8], []]),))
            >>> embed(batch).shape  # the list is not in the row
            torch.Size([2, 4])
            >>> (seen,) = embed.sequences(batch)
            >>> seen.items.shape, seen.mask.tolist()
            (torch.Size([2, 3, 4]), [[True, True, False], [False, False, False]])
            >>> table = embed.tables[0].weight
            >>> torch.equal(seen.items[0, 1], table[8]), torch.equal(seen.target[1], table[9])
            (True, True)
        """
        ids, _, lists = features
        out = []
        for k, length in self.sequence_lists:
            (i, first_row), _ = self.lists[k]
            table = self.tables[i].weight
            items, mask = padded_rows(table, lists[k].values + first_row, lists[k], length)
            out.append(PaddedSequence(items, mask, self._target(k, ids)))
        return out

    def _target(self, k: int, ids: Tensor) -> Tensor | None:
        """`[B, d]`: the embedding of list k's target (attention or sequence_target), or None.
        The target has the list's embedding size, so it lives in the list's parameter."""
        if self.targets[k] is None:
            return None
        column, target_row = self.targets[k]
        return self.tables[self.lists[k][0][0]].weight.index_select(0, ids[:, column] + target_row)
