"""Aligned-MTL (Senushkin et al., CVPR 2023): task gradients made orthogonal and of equal length."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
)
from mtlrec.train.gradients import SharedParameters


@register_weighting("aligned_mtl")
class AlignedMTL(GradientMethod):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023).

    On the shared entries, with G = [g_1 .. g_T] `[P, T]` the gradients of the raw task losses:
        M = G^T G = V diag(lambda) V^T                       (Gram matrix `[T, T]`, eigendecomposed)
        B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T        `[T, T]`
        G^ = G B,    update = G^ w = G (B w)                   (w: the config weights)
    The aligned gradients G^ are orthogonal with equal norms (G^T G^ = lambda_min I): the
    system's condition number is 1, so no task dominates or cancels another, and the update
    has the scale of the smallest eigen-direction.

    Rank deficiency (tasks with linearly dependent or zero gradients): eigenvalues at or below
    `min_eigenvalue_ratio * lambda_max` are dropped with their eigenvectors (the paper's
    rank-R decomposition). The kept directions are aligned as above, lambda_min being the
    smallest kept eigenvalue; G^T G^ is then lambda_min times the projection onto them.
    Keeping a numerically-zero eigenvalue instead would shrink the whole update to ~0.
    The Gram matrix is formed and decomposed in float64. Task-owned entries keep the plain
    gradient of the config-weighted loss.

    `backward` returns the weights of the shared update, B w. No state across steps. Under
    data parallel it acts on each process's gradients before they are averaged.
    """

    class Options(GradientOptions):
        min_eigenvalue_ratio: float = Field(
            1e-10, gt=0.0, lt=1.0, description="eigenvalues of G^T G at or below this fraction of the largest "
                                               "count as zero (their directions are dropped)")

    def task_losses(self, losses: Tensor) -> Tensor:
        """The raw losses: `combine` gets G^T `[T, P]`, not scaled by the config weights."""
        return losses

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        alignment = align_gradients(grads, self.options.min_eigenvalue_ratio)  # B
        update_weights = alignment @ self.base  # B w
        # G (B w) replaces the plain update G w
        return Combined(update_weights @ grads, update_weights, plain=self.base @ grads)


def align_gradients(grads: Tensor, min_eigenvalue_ratio: float = 1e-10) -> Tensor:
    """Aligned-MTL's B `[T, T]` for task gradients `[T, P]`: the aligned gradients are the rows
    of B @ grads (B is symmetric); zero if every gradient is zero."""
    gram = grads.double() @ grads.double().T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > min_eigenvalue_ratio * eigenvalues.max().clamp(min=0)
    if not keep.any():
        return torch.zeros_like(gram, dtype=grads.dtype)
    kept, vectors = eigenvalues[keep], eigenvectors[:, keep]
    alignment = kept.min().sqrt() * (vectors * kept.rsqrt()) @ vectors.T
    return alignment.to(grads.dtype)
