"""Masked per-task losses: each task averaged over the rows where its label exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrec.schema import Schema


def binary_mask(schema: Schema, device: torch.device | str | None = None) -> Tensor:
    """`[T]` bool: which tasks are binary (log loss, sigmoid) rather than regression."""
    return torch.tensor([t.type == "binary" for t in schema.tasks], device=device)


def task_weights(schema: Schema, device: torch.device | str | None = None) -> Tensor:
    """`[T]` float32: the tasks' config weights."""
    return torch.tensor([t.weight for t in schema.tasks], dtype=torch.float32, device=device)


def task_losses(logits: Tensor, labels: Tensor, mask: Tensor, binary: Tensor) -> Tensor:
    """Loss of each task over its own sample space (PLE paper, Eq. 9).

    L_k = sum_i m_ik l_k(logit_ik, y_ik) / sum_i m_ik, with l_k the log loss on the logit for
    binary tasks and the squared error for regression. A task with no labelled row in the
    batch has loss 0 (and so no gradient).

    logits, labels `[B, T]` float; mask `[B, T]` bool; binary `[T]` bool. Returns `[T]`.
    """
    labels = labels.masked_fill(~mask, 0.0)
    log_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    squared = (logits - labels).square()
    per_row = torch.where(binary, log_loss, squared) * mask
    return per_row.sum(0) / mask.sum(0).clamp(min=1)
