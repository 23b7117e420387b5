"""A list of ids -> one vector per row: sum, mean or max pooling, or target attention (DIN).

Sum, mean and max run as one embedding-bag kernel over the list offsets (no padding, no
loop over rows). An empty list pools to the zero vector (for every pooling, attention
included). With element weights, sum is sum_i w_i e_i and mean is sum_i w_i e_i / sum_i w_i
(zero where the weights sum to zero). Attention, and the lists kept as sequences
(`pooling: none`, `mtlrec.nn.sequence`), pad each list to a rectangle (`padded_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.data.features import Jagged
from mtlrec.nn.mlp import MLP
from mtlrec.schema import Attention


def pool(table: Tensor, ids: Tensor, offsets: Tensor, mode: str, weights: Tensor | None = None) -> Tensor:
    """`[N, d]`: row i pools the table rows `ids[offsets[i]:offsets[i + 1]]` by `mode` (sum,
    mean, max), optionally weighted (sum, mean). table `[R, d]`, ids `[V]`, offsets `[N + 1]`.

    Example:
        >>> import torch
        >>> table = torch.arange(6.0).view(3, 2)
        >>> pool(table, torch.tensor([0, 2, 1]), torch.tensor([0, 2, 2, 3]), "mean").tolist()
        [[2.0, 3.0], [0.0, 0.0], [2.0, 3.0]]
    """
    if weights is None:
        pooled = F.embedding_bag(ids, table, offsets, mode=mode, include_last_offset=True)
        if mode == "max":  # torch gives an empty list 0 already; its ONNX export a max over nothing, -inf
            pooled = torch.where((offsets[1:] > offsets[:-1])[:, None], pooled, 0.0)
        return pooled
    pooled = F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype),
                             include_last_offset=True)
    if mode == "sum":
        return pooled
    running = torch.cat([weights.new_zeros(1, dtype=torch.float64), weights.double().cumsum(0)])
    totals = (running.index_select(0, offsets[1:]) - running.index_select(0, offsets[:-1])).to(pooled.dtype)
    nonzero = totals != 0  # a list whose weights sum to 0 pools to 0, with finite gradients (no 0 / 0)
    return pooled * (nonzero / torch.where(nonzero, totals, 1.0))[:, None]


def padded_rows(table: Tensor, ids: Tensor, lists: Jagged, length: int) -> tuple[Tensor, Tensor]:
    """(`[N, L, d]` rows, `[N, L]` bool mask), L = `length`: row i's list's table rows (its last
    L elements when it is longer, `Jagged.padded`) in its first slots, in list order, zero rows
    after them (left-aligned, padded at the end); mask marks the list's elements. table
    `[R, d]`, ids `[V]` (the rows of `lists.values`).

    Example:
        >>> import torch
        >>> table = torch.arange(6.0).view(3, 2)
        >>> rows, mask = padded_rows(table, torch.tensor([2, 1, 0]), Jagged.from_lists([[2, 1], [], [0]]), 2)
        >>> rows.tolist()
        [[[4.0, 5.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]]
        >>> mask.tolist()
        [[True, True], [False, False], [True, False]]
    """
    positions, mask = lists.padded(length)
    rows = torch.cat([table.index_select(0, ids), table.new_zeros(1, table.shape[1])])  # [V + 1, d]: padding last
    return rows.index_select(0, positions.reshape(-1)).view(*positions.shape, -1), mask


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018, section 4.3): the score of a list element
    k against the target q is `MLP([q, k, q - k, q * k])` (hidden layers with PReLU, one
    output); the row's vector is sum_i a_i k_i over its elements, a_i the raw scores (the
    paper: no softmax, to keep the intensity of interest) or, with `softmax`, the scores
    normalised over the row's elements. Padding gets no weight.

    Call args: query `[B, d]`, keys `[B, L, d]`, mask `[B, L]` bool. Returns `[B, d]`.
    """

    def __init__(self, dim: int, options: Attention):
        super().__init__()
        self.softmax = options.softmax
        self.score = MLP(4 * dim, options.hidden, output_dim=1, activation="prelu")

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        q = query[:, None, :].expand_as(keys)
        scores = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # [B, L]
        if self.softmax:
            scores = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            scores = torch.nan_to_num(scores, nan=0.0)  # a row with no element: all -inf
        else:
            scores = scores.masked_fill(~mask, 0.0)
        return torch.einsum("bl,bld->bd", scores, keys)


class AttentionPooling(nn.Module):
    """A list pooled by target attention: the list's first `length` elements (the longest a
    list can be after `max_length`) gathered into `[B, L, d]`, zero rows as padding."""

    def __init__(self, dim: int, length: int, options: Attention):
        super().__init__()
        self.length = length
        self.attention = TargetAttention(dim, options)

    def forward(self, table: Tensor, ids: Tensor, lists: Jagged, query: Tensor) -> Tensor:
        keys, mask = padded_rows(table, ids, lists, self.length)
        return self.attention(query, keys, mask)


__all__ = ["AttentionPooling", "TargetAttention", "padded_rows", "pool"]
