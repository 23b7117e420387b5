"""What a model reads for a batch of rows: single ids, multi-valued id lists and dense values.

A multi-valued feature (a video's tags, a user's last 50 clicked items) is `Jagged`: the
rows' lists laid end to end in `values`, with `offsets` marking where each row's list
starts, the layout of one key of TorchRec's KeyedJaggedTensor. Rows are never padded to
the longest list; a row with an empty list has two equal offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class Jagged:
    """Lists of ids for N rows: row i's ids are `values[offsets[i]:offsets[i + 1]]`.

    values `[V]` int64; offsets `[N + 1]` int64, offsets[0] = 0, non-decreasing, offsets[N] = V;
    weights `[V]` float32 (one per element) or None.

    Example:
        >>> import torch
        >>> tags = Jagged.from_lists([[3, 4], [], [5]])
        >>> tags.values.tolist(), tags.offsets.tolist(), tags.lengths.tolist()
        ([3, 4, 5], [0, 2, 2, 3], [2, 0, 1])
        >>> tags.take(torch.tensor([2, 0])).values.tolist()
        [5, 3, 4]
    """

    values: Tensor
    offsets: Tensor
    weights: Tensor | None = None

    @classmethod
    def from_lists(cls, lists: list[list[int]], weights: list[list[float]] | None = None) -> Jagged:
        """From Python lists (for examples and tests; the encoder builds it from columns)."""
        lengths = torch.tensor([len(row) for row in lists], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = torch.tensor([v for row in lists for v in row], dtype=torch.long)
        w = None if weights is None else torch.tensor([v for row in weights for v in row], dtype=torch.float32)
        return cls(values, offsets, w)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def lengths(self) -> Tensor:
        """`[N]` list length of each row."""
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str) -> Jagged:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Jagged(move(self.values), move(self.offsets), move(self.weights))

    def rows(self, start: int, stop: int) -> Jagged:
        """Rows start..stop-1: the values as a view, the offsets renumbered from 0."""
        stop = min(stop, len(self))
        offsets = self.offsets[start : stop + 1]
        first, last = int(offsets[0]), int(offsets[-1])
        w = None if self.weights is None else self.weights[first:last]
        return Jagged(self.values[first:last], offsets - first, w)

    def take(self, index: Tensor) -> Jagged:
        """The rows `index` `[M]`, in that order, gathered without a Python loop over rows."""
        starts = self.offsets.index_select(0, index)
        lengths = self.offsets.index_select(0, index + 1) - starts
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        total = int(offsets[-1])
        row = torch.repeat_interleave(torch.arange(len(index), device=index.device), lengths, output_size=total)
        position = starts.index_select(0, row) + torch.arange(total, device=index.device) - offsets.index_select(0, row)
        w = None if self.weights is None else self.weights.index_select(0, position)
        return Jagged(self.values.index_select(0, position), offsets, w)

    def concat(self, other: Jagged) -> Jagged:
        """These rows followed by `other`'s."""
        if (self.weights is None) != (other.weights is None):
            raise ValueError("cannot concatenate lists with element weights to lists without")
        offsets = torch.cat([self.offsets, other.offsets[1:] + self.offsets[-1]])
        w = None if self.weights is None else torch.cat([self.weights, other.weights])
        return Jagged(torch.cat([self.values, other.values]), offsets, w)

    def padded(self, length: int) -> tuple[Tensor, Tensor]:
        """`([N, L] positions into values, [N, L] bool mask)` of each row's last `length`
        elements (all of a shorter list), in list order from slot 0. Padding points one past
        the last value (V), so a caller appends one value (a row of zeros) to gather a
        rectangle. For attention and kept sequences, which need one; pooling never pads.

        Example:
            >>> Jagged.from_lists([[1, 2, 3], [4]]).padded(2)[0].tolist()   # V = 4: padding
            [[1, 2], [3, 4]]
        """
        slots = torch.arange(length, device=self.offsets.device)
        lengths = self.lengths[:, None]
        mask = slots < lengths.clamp(max=length)
        first = self.offsets[:-1, None] + (lengths - length).clamp(min=0)  # a longer list: its last `length`
        positions = torch.where(mask, first + slots, self.values.shape[0])
        return positions, mask


class Features(NamedTuple):
    """A batch's model inputs.

    ids `[B, S]` int64 (the single-valued sparse features, schema order), dense `[B, D]`
    float32, lists: one `Jagged` per multi-valued sparse feature, schema order.
    """

    ids: Tensor
    dense: Tensor
    lists: tuple[Jagged, ...] = ()


__all__ = ["Features", "Jagged"]
