"""The interface every loss weighting implements, its typed options, and its registry.

The trainer calls, per step, `backward(losses, shared, penalty, representation=Z)` (Z: the
model's shared representation, or None), which leaves gradients in `.grad` and returns the
task weights it used; then `after_step()` once the optimizer has stepped,
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
no T task gradients on some steps (Nash-MTL reusing its weights) overrides `update`, which
returns the change to the shared entries' gradient (`SharedUpdate`).

The representation-gradient shortcut (`on: representation`, every gradient method's option,
`GradientOptions`): the g_k are taken on the model's shared representation Z (the tensor
every task reads, `mtlrec.models.base.BackboneOutput`) instead of the shared parameters:
T backward passes through the towers (and the experts' mixing) only, and `combine` works on `[T, N]`,
N = Z.numel(), rather than `[T, P]`. The shared parameters' update follows in one of two
ways, by the method's `representation_update`:

    "weights": the update is a weighting of the losses, sum_k c_k grad L_k (`Combined.weights`
        are the c_k): the c_k found on Z weight the whole shared update, one backward pass of
        sum_k (c_k - w_k) L_k on the shared parameters (MGDA-UB, Sener & Koltun 2018, Sec. 3.3).
    "direction": the direction d `[N]` on Z is backpropagated through Z into the shared
        parameters: they get J_Z^T d in place of the plain sum's J_Z^T sum_k g_k. It rides the
        plain backward pass (a hook on Z adds d - sum_k g_k to Z's gradient), so it costs no
        pass of its own. Gradient paths that reach shared parameters around Z (MMoE's gates
        read the embedding output, which is shared) keep the plain weighted sum there.
        TorchRec's fused tables, upstream of Z, get the direction too (on the parameters,
        and with "weights", they keep the plain weighted sum: their gradient never exists).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlrec.schema import typed_options
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters, flat_gradient, write_gradient


class WeightingOptions(BaseModel):
    """A weighting's options (none for the base); subclasses add typed fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GradientOptions(WeightingOptions):
    """The option every method that reads task gradients shares: where it takes them."""

    on: Literal["parameters", "representation"] = Field(
        "parameters", description="where the task gradients are taken: on the shared parameters, or on the model's "
        "shared representation Z (the backbone output every task reads; T backward passes through the towers only)")


class Weighting(nn.Module):
    """Base: fixed weights w_k from the tasks' config, L = sum_k w_k L_k."""

    Options: type[WeightingOptions] = WeightingOptions
    needs_task_gradients: ClassVar[bool] = False  # reads each task's gradient of the shared parameters
    # every step on the device, its state in buffers changed in place: a CUDA graph can record it
    capturable: ClassVar[bool] = False

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

    @property
    def reads_representation(self) -> bool:
        """Whether `backward` needs the model's shared representation Z (`on: representation`)."""
        return isinstance(self.options, GradientOptions) and self.options.on == "representation"

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        """Backpropagate the weighted loss (+ `extra`, a model's own penalty); return the weights `[T]`.
        `shared`: what all tasks share (a `GradientMethod` acts there alone); `representation`:
        the model's shared representation Z, read where `reads_representation`."""
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
    """What a gradient method makes of the task gradients g_k `[T, P]` (`GradientMethod.combine`;
    `[T, N]` on the representation, and then `[N]` for `[P]` below).

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

    change: Tensor | None  # [P]: added to the plain weighted sum's gradient on the shared entries
    weights: Tensor | None  # [T] returned by `backward`; None: the plain sum's weights
    on_representation: Tensor | None = None  # [N]: added to Z's gradient in the plain backward pass


class GradientMethod(Weighting):
    """Base of the gradient methods: the plain weighted sum's gradient everywhere, except on
    the shared entries, which get the `direction` that `combine` makes of the task gradients
    g_k `[T, P]` (the gradients of `task_losses` on the shared entries, task-owned entries 0).
    Parameters a single task owns keep their plain gradient; with nothing shared, `backward`
    is the plain weighted sum.

    With `on: representation` the g_k are `[T, N]`, on the representation Z, and
    `representation_update` says how the result reaches the shared parameters (the module
    docstring): "weights" for a method whose update is sum_k c_k grad L_k with c_k its
    `Combined.weights`, "direction" otherwise."""

    Options: type[GradientOptions] = GradientOptions
    needs_task_gradients = True
    representation_update: ClassVar[Literal["weights", "direction"]] = "weights"

    def task_losses(self, losses: Tensor) -> Tensor:
        """The losses `[T]` whose gradients `combine` receives: w_k L_k (w_k the config weight)."""
        return self.base * losses

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        """The method's math: from the task gradients `[T, P]` (task-owned entries 0) and the raw
        losses `[T]` to the update on the shared entries `shared` (the columns of `grads`, in
        the order of `flat_gradient`); on the representation, `grads` is `[T, N]` and `shared`
        None (the columns are Z's entries). Called before the plain backward pass (the step
        count is still that of the previous step)."""
        raise NotImplementedError

    def update(self, losses: Tensor, shared: SharedParameters, representation: Tensor | None = None) -> SharedUpdate:
        """The change of this step to the shared entries' plain gradient: from the T task
        gradients, by `combine`. Override it for an update that needs no task gradients."""
        grads = task_gradients(self, self.task_losses(losses), shared, representation)
        combined = self.combine(grads, losses, None if self.reads_representation else shared)
        if self.reads_representation and self.representation_update == "weights":
            return self.reweighted(combined.weights, losses, shared)
        change = combined.direction - (grads.sum(0) if combined.plain is None else combined.plain)
        if self.reads_representation:  # a direction on Z: added to Z's gradient in the plain backward pass
            return SharedUpdate(None, combined.weights, on_representation=change)
        return SharedUpdate(change, combined.weights)

    def reweighted(self, weights: Tensor, losses: Tensor, shared: SharedParameters) -> SharedUpdate:
        """The update sum_k c_k grad L_k on the shared entries, c = `weights` `[T]` (the
        coefficients on the raw losses): one backward pass of sum_k (c_k - w_k) L_k, w the plain
        sum's weights, gives the change to the plain gradient."""
        change = shared_gradient(((weights.detach() - self.weights(losses).detach()) * losses).sum(), shared)
        return SharedUpdate(change, weights.detach())

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        """As `Weighting.backward`, with the shared entries' gradient replaced by the method's
        update; `representation`, Z, is read with `on: representation`."""
        shared = SharedParameters.of(shared)
        if not shared.params:
            return super().backward(losses, shared, extra)
        update = self.update(losses, shared, representation)
        hook = None
        if update.on_representation is not None:  # Z's gradient := the direction, on its way upstream
            change = update.on_representation.reshape(representation.shape).to(representation.dtype)
            hook = representation.register_hook(lambda grad: grad + change)
        try:
            weights = super().backward(losses, shared, extra)  # every .grad: the plain weighted sum
        finally:
            if hook is not None:
                hook.remove()
        if update.change is not None:
            write_gradient(update.change, shared.params, add=True)  # shared part := direction
        return weights if update.weights is None else update.weights


def refuse_representation(weighting: Weighting, name: str) -> None:
    """For a method whose coefficients scale as 1 / ||g|| (Nash-MTL, FairGrad): `on:
    representation` is an error. The gradients on Z are about sqrt(B) times smaller than on
    the parameters, so the coefficients found there would scale the parameters' update by a
    factor that depends on the batch size."""
    if weighting.reads_representation:
        raise ValueError(f"weighting {name!r} cannot take on: representation: its coefficients scale as 1 / ||g||, "
                         "and the gradients on the representation are about sqrt(batch size) times smaller than on "
                         "the parameters, so the update would grow with the batch size; use on: parameters")


def task_gradients(weighting: Weighting, losses: Tensor, shared: SharedParameters,
                   representation: Tensor | None) -> Tensor:
    """Each loss's gradient where `weighting` takes them: `[T, N]` on the representation Z with
    `on: representation`, else `[T, P]` on the shared entries (task-owned entries 0)."""
    if weighting.reads_representation:
        return representation_gradients(losses, required_representation(representation, weighting))
    return shared.task_gradients(losses)


def required_representation(representation: Tensor | None, weighting: Weighting) -> Tensor:
    """Z itself; an error naming the weighting when the caller gave none."""
    if representation is None:
        raise ValueError(f"weighting {type(weighting).__name__} with on: representation needs the model's shared "
                         "representation Z, and none was given: the model names none (its backbone's "
                         "has_representation is False), or the caller did not pass backward(..., representation=Z)")
    return representation


def shared_gradient(loss: Tensor, shared: SharedParameters) -> Tensor:
    """`[P]`: the gradient of one loss on the shared entries (task-owned entries 0); graph kept."""
    flat = flat_gradient(torch.autograd.grad(loss, shared.params, retain_graph=True, allow_unused=True), shared.params)
    mask = shared.flat_mask()
    return flat if mask is None else flat * mask


def representation_gradients(losses: Tensor, representation: Tensor) -> Tensor:
    """`[T, N]`: each loss's gradient on the representation Z (N = Z.numel()), at least in
    float32 (Z may be bfloat16 under autocast); a constant loss has gradient 0 (a task without
    labelled rows gets a loss that still reads Z, with gradient 0). The graph is kept for the
    backward pass that follows. A loss that is not constant but does not read Z is an error:
    Z is then not what every task reads."""
    if not representation.requires_grad:
        raise ValueError("the shared representation Z depends on no trained parameter: no gradient can be taken on it")
    dtype = torch.promote_types(representation.dtype, torch.float32)
    rows = []
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            rows.append(torch.zeros(representation.numel(), dtype=dtype, device=representation.device))
            continue
        grad = torch.autograd.grad(loss, representation, retain_graph=True, allow_unused=True)[0]
        if grad is None:
            raise ValueError(f"loss {k} does not read the shared representation Z (a model whose tasks do not all "
                             "read it, or a compiled forward): no gradient on Z for it; use on: parameters")
        rows.append(grad.reshape(-1).to(dtype))
    return torch.stack(rows)


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
