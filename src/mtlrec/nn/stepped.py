"""Modules with state that the trainer moves after each optimizer step, not by gradients."""

from __future__ import annotations

from torch import nn


class SteppedModule(nn.Module):
    """A module whose buffers the trainer updates once after every optimizer step, e.g. the
    per-expert selection bias of auxiliary-loss-free load balancing (DeepSeek-V3).

    The trainer calls `after_optimizer_step()` on every `SteppedModule` in the model, in
    `model.modules()` order, after the optimizers have stepped. What the update reads (e.g. the
    expert load of the last forward in training) the module keeps in buffers, so that a
    checkpoint holds it and a resumed run continues exactly.
    """

    def after_optimizer_step(self) -> None:
        raise NotImplementedError

    def end_epoch(self) -> dict[str, float]:
        """Figures for the epoch's log row (e.g. a router's load imbalance), called at the end of
        every training epoch on every process (it may all-reduce)."""
        return {}


def stepped_modules(model: nn.Module) -> list[SteppedModule]:
    """The `SteppedModule`s of `model`, in `model.modules()` order."""
    return [m for m in model.modules() if isinstance(m, SteppedModule)]
