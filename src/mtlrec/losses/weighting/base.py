"""The interface every loss weighting implements, its typed options, and its registry.

The trainer calls, per step, `backward(losses, shared)`, which leaves gradients in `.grad`
and returns the task weights it used; then `after_step()` once the optimizer has stepped,
and `end_epoch(mean_losses)` after each epoch. Methods that only reweight the losses
override `weights` (and `regularizer`); GradNorm, GLS, FAMO and STCH override `backward`.
A weighting may own parameters (uncertainty, learnable, GradNorm); the trainer optimises
them with the model.

A method is one file: a `Weighting` subclass with its `Options` and `@register_weighting`.

A gradient method (PCGrad, MGDA, CAGrad, ...) subclasses `GradientMethod`. It replaces the
update on the shared entries only (`SharedParameters`: a task's own experts in a fused bank
are not shared); `GradientMethod.backward` holds the skeleton all of them share:

    shared = SharedParameters.of(shared)
    if not shared.params: return Weighting.backward(...)     # nothing shared: the plain sum
    grads = shared.task_gradients(self.task_losses(losses))  # g_k [T, P], task-owned entries 0
    combined = self.combine(grads, losses, shared)           # Combined(direction [P], weights [T])
    weights = Weighting.backward(losses, shared, extra)      # every .grad: the plain weighted sum
    write_gradient(combined.direction - grads.sum(0), shared.params, add=True)  # shared := direction
    return combined.weights (None: weights)

A method implements `combine` alone: its math, from the task gradients g_k to the direction
and the weights to log. `task_losses` (the w_k L_k by default) can be overridden: Aligned-MTL
takes the raw losses (and gives `Combined.plain`, the plain update G w, in place of
sum_k g_k), IMTL the IMTL-L-scaled ones, DB-MTL the log losses. A method whose update needs
no T task gradients on some steps (Nash-MTL reusing its weights, MGDA-UB) overrides
`update`, which returns the change to the shared entries' gradient (`SharedUpdate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtlrec.schema import typed_options
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters, write_gradient


class WeightingOptions(BaseModel):
    """A weighting's options (none for the base); subclasses add typed fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Weighting(nn.Module):
    """Base: fixed weights w_k from the tasks' config, L = sum_k w_k L_k."""

    Options: type[WeightingOptions] = WeightingOptions
    needs_task_gradients: ClassVar[bool] = False  # reads each task's gradient of the shared parameters

    def __init__(self, tasks: TaskSet, options: WeightingOptions | None = None):
        super().__init__()
        self.options = options or self.Options()
        self.num_tasks = len(tasks)
        self.register_buffer("base", tasks.weights.clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def weights(self, losses: Tensor) -> Tensor:
        """Task weights `[T]` for this step (may carry gradient to the weighting's parameters)."""
        return self.base

    def regularizer(self) -> Tensor | float:
        return 0.0

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None) -> Tensor:
        """Backpropagate the weighted loss (+ `extra`, a model's own penalty); return the weights `[T]`.
        `shared`: what all tasks share (a `GradientMethod` acts there alone)."""
        w = self.weights(losses)
        total = (w * losses).sum() + self.regularizer()
        if extra is not None:
            total = total + extra
        total.backward()
        self.steps += 1
        return w.detach()

    def after_step(self) -> None:
        pass

    def end_epoch(self, mean_losses: Tensor) -> None:
        self.epochs += 1


class Combined(NamedTuple):
    """What a gradient method makes of the task gradients g_k `[T, P]` (`GradientMethod.combine`).

    direction: `[P]`, the update on the shared entries, in place of the plain sum's gradient.
    weights: `[T]`, what `backward` returns (logged): the update's coefficient on each loss
        L_k; None: the plain sum's weights (when no per-task weight describes the update).
    plain: `[P]`, the plain weighted sum's gradient on the shared entries (what `direction`
        replaces); None: sum_k g_k, which it is when the task losses are the weighted losses.
    """

    direction: Tensor
    weights: Tensor | None = None
    plain: Tensor | None = None


class SharedUpdate(NamedTuple):
    """The change to the shared entries' gradient and the weights to return (`GradientMethod.update`)."""

    change: Tensor  # [P]: added to the plain weighted sum's gradient on the shared entries
    weights: Tensor | None  # [T] returned by `backward`; None: the plain sum's weights


class GradientMethod(Weighting):
    """Base of the gradient methods: the plain weighted sum's gradient everywhere, except on
    the shared entries, which get the `direction` that `combine` makes of the task gradients
    g_k `[T, P]` (the gradients of `task_losses` on the shared entries, task-owned entries 0).
    Parameters a single task owns keep their plain gradient; with nothing shared, `backward`
    is the plain weighted sum."""

    needs_task_gradients = True

    def task_losses(self, losses: Tensor) -> Tensor:
        """The losses `[T]` whose gradients `combine` receives: w_k L_k (w_k the config weight)."""
        return self.base * losses

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters) -> Combined:
        """The method's math: from the task gradients `[T, P]` (task-owned entries 0) and the raw
        losses `[T]` to the update on the shared entries `shared` (the columns of `grads`, in
        the order of `flat_gradient`). Called before the plain backward pass (the step count
        is still that of the previous step)."""
        raise NotImplementedError

    def update(self, losses: Tensor, shared: SharedParameters) -> SharedUpdate:
        """The change of this step to the shared entries' plain gradient: from the T task
        gradients, by `combine`. Override it for an update that needs no task gradients."""
        grads = shared.task_gradients(self.task_losses(losses))  # [T, P], task-owned entries 0
        combined = self.combine(grads, losses, shared)
        plain = grads.sum(0) if combined.plain is None else combined.plain
        return SharedUpdate(combined.direction - plain, combined.weights)

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, **inputs: Any) -> Tensor:
        """As `Weighting.backward`, with the shared entries' gradient replaced by the method's
        update; `inputs` go to `update` (MGDA-UB's representation)."""
        shared = SharedParameters.of(shared)
        if not shared.params:
            return super().backward(losses, shared, extra)
        update = self.update(losses, shared, **inputs)
        weights = super().backward(losses, shared, extra)  # every .grad: the plain weighted sum
        write_gradient(update.change, shared.params, add=True)  # shared part := direction
        return weights if update.weights is None else update.weights


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step `step`, on `device`: seeded with (seed * 0x9E3779B97F4A7C15 + step)
    mod 2^64, so its draws depend on (seed, step) alone. A CPU generator keeps only the low 32
    bits of a seed; with the odd multiplier they still differ for every step of a run (below
    2^32 steps) and between nearby seeds."""
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**64)


WEIGHTINGS: dict[str, type[Weighting]] = {}


def register_weighting(name: str) -> Callable[[type[Weighting]], type[Weighting]]:
    """Class decorator: make a weighting available to configs as `train.weighting: <name>`."""

    def decorate(cls: type[Weighting]) -> type[Weighting]:
        WEIGHTINGS[name] = cls
        return cls

    return decorate


def split_spec(spec: str | dict[str, Any]) -> tuple[str, WeightingOptions]:
    """`"uncertainty"` or `{"name": "decay", "gamma": 0.95}` -> (name, typed options)."""
    if isinstance(spec, str):
        name, options = spec, {}
    else:
        options = dict(spec)
        name = options.pop("name", None)
        if name is None:
            raise ValueError(f"a weighting given as a mapping needs a 'name' (one of {sorted(WEIGHTINGS)})")
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; allowed: {sorted(WEIGHTINGS)}")
    options_class = WEIGHTINGS[name].Options
    return name, typed_options(f"weighting {name!r}", options_class, options, list(options_class.model_fields))


def create_weighting(spec: str | dict[str, Any], tasks: TaskSet) -> Weighting:
    """The weighting a config names, for these tasks."""
    name, options = split_spec(spec)
    return WEIGHTINGS[name](tasks, options)
