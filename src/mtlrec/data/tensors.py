"""Encoded data as pre-built tensors, sliced into batches without per-row Python.

`TensorData` is both the in-memory batch source and the batch type every source yields
(see `mtlrec.data.source`). Its fields are tensors with the rows first, so slicing,
gathering, concatenating and moving apply to every field alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlrec.data.features import Features, Jagged


@dataclass
class TensorData:
    """Encoded rows: single-valued sparse ids `[N, S]` int64, dense `[N, D]` float32,
    labels `[N, T]` float32 (0 where missing), label mask `[N, T]` bool (True = label present),
    one `Jagged` per multi-valued sparse feature, sample weights `[N, T]` float32 (None:
    every row weighs 1), and each row's ranking list `[N]` int64 (`rank.group_by`, coded
    within the split; None without it).
    """

    sparse: Tensor
    dense: Tensor
    labels: Tensor
    mask: Tensor
    lists: tuple[Jagged, ...] = field(default=())
    weights: Tensor | None = None
    groups: Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def features(self) -> Features:
        """What the model reads."""
        return Features(self.sparse, self.dense, self.lists)

    def _map(self, fn, fn_lists) -> TensorData:
        return TensorData(fn(self.sparse), fn(self.dense), fn(self.labels), fn(self.mask),
                          tuple(fn_lists(j) for j in self.lists), None if self.weights is None else fn(self.weights),
                          None if self.groups is None else fn(self.groups))

    def to(self, device: torch.device | str) -> TensorData:
        return self._map(lambda t: t.to(device, non_blocking=True), lambda j: j.to(device))

    def concat(self, other: TensorData) -> TensorData:
        """These rows followed by `other`'s."""
        if (self.weights is None) != (other.weights is None):
            raise ValueError("cannot concatenate rows with sample weights to rows without")
        if (self.groups is None) != (other.groups is None):
            raise ValueError("cannot concatenate rows with ranking groups to rows without")
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        return TensorData(cat(self.sparse, other.sparse), cat(self.dense, other.dense), cat(self.labels, other.labels),
                          cat(self.mask, other.mask), tuple(a.concat(b) for a, b in zip(self.lists, other.lists)),
                          None if self.weights is None else cat(self.weights, other.weights),
                          None if self.groups is None else cat(self.groups, other.groups))

    def take(self, index: Tensor) -> TensorData:
        return self._map(lambda t: t.index_select(0, index), lambda j: j.take(index))

    def rows(self, start: int, stop: int) -> TensorData:
        """Rows start..stop-1, as views (list offsets renumbered)."""
        return self._map(lambda t: t[start:stop], lambda j: j.rows(start, stop))

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[TensorData]:
        """Consecutive batches (views); with a generator, of a fresh permutation of the rows,
        each batch gathered on its own (no shuffled copy of the whole data)."""
        if generator is None:
            for start in range(0, len(self), batch_size):
                yield self.rows(start, start + batch_size)
            return
        for index in self.batch_indices(batch_size, generator):
            yield self.take(index)

    def batch_indices(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """The row indices `[batch_size]` (fewer in the last) of each shuffled batch, on the
        rows' device: `batches(batch_size, generator)` is `take` of each."""
        order = torch.randperm(len(self), generator=generator).to(self.labels.device)
        for start in range(0, len(self), batch_size):
            yield order[start : start + batch_size]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def shard(self, rank: int, world: int) -> TensorShard:
        """Process `rank`'s part of these rows when `world` processes share them."""
        return TensorShard(self, rank, world)


@dataclass
class TensorShard:
    """One process's part of in-memory rows (`TensorData.shard`).

    Shuffled (training): every process draws the same permutation of all rows and takes its
    slice of each global batch of `world * batch_size` rows, so N processes see the batches
    one process would. In order (evaluation): the process takes a contiguous block of rows,
    so the blocks gathered in rank order are the rows in order.
    """

    data: TensorData
    rank: int
    world: int

    def __len__(self) -> int:
        return len(self._block())

    def _block(self) -> TensorData:
        share = -(-len(self.data) // self.world)
        return self.data.rows(self.rank * share, (self.rank + 1) * share)

    def to(self, device: torch.device | str) -> TensorShard:
        return TensorShard(self.data.to(device), self.rank, self.world)

    def num_batches(self, batch_size: int) -> int:
        return self.data.num_batches(batch_size * self.world)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[TensorData]:
        """`batch_size` rows per process and batch (fewer in the last)."""
        if generator is None:
            yield from self._block().batches(batch_size)
            return
        for batch in self.data.batches(batch_size * self.world, generator):
            share = -(-len(batch) // self.world)
            yield batch.rows(self.rank * share, (self.rank + 1) * share)
