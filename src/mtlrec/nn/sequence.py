"""Lists kept as sequences (`pooling: none`) and the encoder that reads them: the Behavior
Sequence Transformer (BST; Chen et al., "Behavior Sequence Transformer for E-commerce
Recommendation in Alibaba", DLP-KDD 2019, arXiv 1905.06874, section 2).

The embedding layer hands such a list on as a `PaddedSequence`: the embeddings of the list's
last max_length elements, oldest first, left-aligned (slots 0..n-1 hold the n elements,
zero rows pad the rest), with a mask, and the embedding of the list's `sequence_target`
when it has one. Left-aligned because that is the layout attention pooling already pads to
(`mtlrec.nn.pooling.padded_rows`): one routine pads every list. The encoder indexes
positions by recency, so where the padding sits changes nothing it computes.

BST reads the target item and the history as one sequence. Each element's vector is its
item embedding concatenated with a position embedding. The paper's position feature is the
time gap t(target) - t(item); the rows carry no timestamps, so the position here is a learned
embedding of the recency rank instead: 0 for the target, r for the r-th most recent history
element. That keeps the order of the history but not how far apart its clicks were. The
sequence goes newest first through `layers` blocks (the paper's transformer layer, stacked):

    MH(S) = Concat(head_1, ..., head_h) W^H,
    head_i = softmax(S W_i^Q (S W_i^K)^T / sqrt(d)) S W_i^V           (every W_i d x d)
    S' = LayerNorm(S + Dropout(MH(S)))
    F  = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2))

d being the token width (embedding + position). Padding gets no attention weight; its own
outputs are zeroed. The encoded list is (`output`): `concat`, every position's vector side
by side, target first, then newest to oldest, padding zeros (as the paper's Figure 1 draws
the transformer's outputs going into the MLP; its text can be read as the target's output
alone, which is `target`; concat is the default because it also works without a target);
`mean`, the mean over the real positions (target included); `target`, the target's position
alone. A list with no element is the target alone, or, without a target, zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.schema import Schema

if TYPE_CHECKING:
    from mtlrec.models.options import SequenceEncoderOptions


class PaddedSequence(NamedTuple):
    """One list feature of a batch, as the sequence encoder reads it.

    items `[B, L, d]`: the list's elements (its last L = max_length), oldest first, zero rows
    after them; mask `[B, L]` bool, True at the elements; target `[B, d]`, the embedding of the
    feature's `sequence_target`, or None.
    """

    items: Tensor
    mask: Tensor
    target: Tensor | None = None


def newest_first(items: Tensor, mask: Tensor) -> Tensor:
    """`[B, L, d]` left-aligned elements (oldest first) -> the same rows newest first: slot r
    holds the r-th most recent element. The mask is unchanged (slot r is real iff r < n).

    Example:
        >>> items = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [0.0], [0.0]]])
        >>> newest_first(items, torch.tensor([[True, True, True], [True, False, False]]))[:, :, 0].tolist()
        [[3.0, 2.0, 1.0], [4.0, 4.0, 4.0]]
    """
    slots = torch.arange(items.shape[1], device=items.device)
    index = (mask.sum(1, keepdim=True) - 1 - slots).clamp(min=0)  # [B, L]; padding reads slot 0 (masked anyway)
    return items.gather(1, index.unsqueeze(-1).expand_as(items))


class MultiHeadSelfAttention(nn.Module):
    """MH(S) = Concat(head_1..head_h) W^H, head_i = softmax(S W_i^Q (S W_i^K)^T / sqrt(d)) S W_i^V,
    with W_i^Q, W_i^K, W_i^V of size d x d (every head at the token's full width, as the
    paper writes them) and W^H of size hd x d; no biases. Keys outside the mask get no weight.

    Call args: s `[B, n, d]`, mask `[B, n]` bool. Returns `[B, n, d]`.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = dim ** -0.5
        self.project = nn.Linear(dim, 3 * heads * dim, bias=False)  # [W_1^Q .. W_h^Q, W_1^K .., W_1^V ..]
        self.merge = nn.Linear(heads * dim, dim, bias=False)  # W^H

    def forward(self, s: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.project(s).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each [B, h, n, d]
        scores = (q @ k.transpose(-1, -2)) * self.scale  # [B, h, n, n]
        # the smallest finite value, not -inf: a row with no key left (an empty list without a
        # target) then gets finite weights, whose outputs are zeroed, and no NaN in any gradient
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        heads = torch.softmax(scores, dim=-1) @ v  # [B, h, n, d]
        return self.merge(heads.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """S' = LayerNorm(S + Dropout(MH(S))), F = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2))
    (BST's transformer layer; LeakyReLU's slope 0.01). Call args: s `[B, n, d]`, mask `[B, n]`. Returns `[B, n, d]`."""

    def __init__(self, dim: int, heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadSelfAttention(dim, heads)
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_hidden)
        self.ffn_out = nn.Linear(ffn_hidden, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, s: Tensor, mask: Tensor) -> Tensor:
        s = self.attention_norm(s + self.dropout(self.attention(s, mask)))
        return self.ffn_norm(s + self.dropout(self.ffn_out(F.leaky_relu(self.ffn_in(s)))))


class SequenceTransformer(nn.Module):
    """BST over one list: `PaddedSequence` -> `[B, out_dim]` (see the module docstring).

    Args:
        dim: the list's (and its target's) embedding size.
        length: the list's max_length L.
        with_target: whether the list has a sequence_target (the sequence is L + 1 long).
        options: heads, layers, ffn_hidden, position_dim, dropout, output.

    out_dim: (L + 1) x w for concat with a target (L x w without), w for mean and target,
    w = dim + position_dim the token width.

    Example:
        >>> from mtlrec.models.options import SequenceEncoderOptions
        >>> encoder = SequenceTransformer(4, 3, True, SequenceEncoderOptions(heads=2, position_dim=2))
        >>> items, mask = torch.randn(5, 3, 4), torch.tensor([[True, True, False]] * 5)
        >>> encoder(PaddedSequence(items, mask, torch.randn(5, 4))).shape, encoder.out_dim
        (torch.Size([5, 24]), 24)
    """

    def __init__(self, dim: int, length: int, with_target: bool, options: SequenceEncoderOptions):
        super().__init__()
        if options.output == "target" and not with_target:
            raise ValueError("sequence_encoder output 'target' needs the list's sequence_target")
        position_dim = options.position_dim or dim
        width = dim + position_dim
        self.with_target = with_target
        self.output = options.output
        # row 0: the target; row r: the r-th most recent. Drawn as the tables are, N(0, 0.01^2): the first
        # LayerNorm then scales the whole token up, so the encoder's output follows the items from the first step
        # (positions drawn from N(0, 1) swamped them: on history_quality seed 0 y1's AUC fell from 0.993 to 0.838)
        self.positions = nn.Embedding(length + 1, position_dim)
        nn.init.normal_(self.positions.weight, std=0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, options.heads, options.ffn_hidden or 4 * width, options.dropout)
            for _ in range(options.layers)
        )
        tokens = length + with_target
        self.out_dim = tokens * width if self.output == "concat" else width

    def forward(self, sequence: PaddedSequence) -> Tensor:
        items, mask, target = sequence
        if (target is not None) != self.with_target:
            raise ValueError(f"the encoder was built {'with' if self.with_target else 'without'} a target")
        tokens = newest_first(items, mask)
        first = 1  # position row of the newest element
        if target is not None:
            tokens = torch.cat([target.unsqueeze(1), tokens], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
            first = 0
        positions = self.positions.weight[first : first + tokens.shape[1]]  # [n, p]
        s = torch.cat([tokens, positions.unsqueeze(0).expand(tokens.shape[0], -1, -1)], dim=-1)  # [B, n, w]
        for block in self.blocks:
            s = block(s, mask)
        if self.output == "target":
            return s[:, 0]
        s = torch.where(mask.unsqueeze(-1), s, torch.zeros((), dtype=s.dtype, device=s.device))
        if self.output == "mean":
            return s.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
        return s.flatten(1)


def check_sequence_encoder(schema: Schema, encoder: SequenceEncoderOptions | None, fused_tables: bool = False) -> None:
    """The schema's `pooling: none` lists and the model's `sequence_encoder` go together; a
    ValueError names the features and the option to set. `fused_tables`: the run trains
    TorchRec's tables (train.embedding_tables: fused or embedding_sharding), which pool every
    list and cannot hand one on as a sequence."""
    names = [f.name for f in schema.sequences]
    if names and encoder is None:
        raise ValueError(f"sparse feature(s) {names} have pooling: none (kept as a sequence), which a model reads "
                         "with model.sequence_encoder: set it (e.g. sequence_encoder: {name: transformer}), or "
                         "give them a pooling (sum, mean, max, attention)")
    if encoder is not None and not names:
        raise ValueError("model.sequence_encoder reads the sparse features with pooling: none, and there are none: "
                         "set pooling: none (and max_length) on a list feature, or remove sequence_encoder")
    if encoder is not None and encoder.output == "target":
        untargeted = [f.name for f in schema.sequences if f.sequence_target is None]
        if untargeted:
            raise ValueError(f"model.sequence_encoder output 'target' reads the target's position, and sparse "
                             f"feature(s) {untargeted} have no sequence_target: give them one, or use output concat "
                             "or mean")
    if names and fused_tables:
        raise ValueError(f"sparse feature(s) {names} have pooling: none, which TorchRec's tables "
                         "(train.embedding_tables: fused, train.embedding_sharding) do not hand on: use "
                         "embedding_tables: plain and embedding_sharding: none")


def sequence_encoders(schema: Schema, encoder: SequenceEncoderOptions | None) -> nn.ModuleList:
    """One `SequenceTransformer` per `pooling: none` list, schema order (empty without any);
    ValueError as `check_sequence_encoder`."""
    check_sequence_encoder(schema, encoder)
    return nn.ModuleList(SequenceTransformer(f.embedding_dim, f.max_length, f.sequence_target is not None, encoder)
                         for f in schema.sequences)


__all__ = ["MultiHeadSelfAttention", "PaddedSequence", "SequenceTransformer", "TransformerBlock",
           "check_sequence_encoder", "newest_first", "sequence_encoders"]
