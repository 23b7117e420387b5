"""The model zoo and its registry: `create("ple", schema, **options)`, `list_models()`.

Every model takes sparse ids `[B, S]` and dense values `[B, D]` and returns
`ModelOutput(logits [B, T], gates)`. Options are the backbone's keyword arguments (see each
class's docstring) plus the towers' `tower_hidden` and `tower_dropout`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from mtlrec.models.base import Backbone, BackboneOutput, ModelOutput, MultiTaskModel, SingleTaskModels
from mtlrec.models.moe import MMoE, OMoE
from mtlrec.models.ple import CGC, PLE, ExtractionLevel
from mtlrec.models.shared_bottom import SharedBottom
from mtlrec.schema import Schema

# name -> (wrapper, backbone). single_task: one independent shared-bottom network per task.
_MODELS: dict[str, tuple[type[nn.Module], type[Backbone]]] = {
    "single_task": (SingleTaskModels, SharedBottom),
    "shared_bottom": (MultiTaskModel, SharedBottom),
    "omoe": (MultiTaskModel, OMoE),
    "mmoe": (MultiTaskModel, MMoE),
    "cgc": (MultiTaskModel, CGC),
    "ple": (MultiTaskModel, PLE),
}
_TOWER_OPTIONS = {"tower_hidden": (64,), "tower_dropout": 0.0}


def list_models() -> list[str]:
    return list(_MODELS)


def model_options(name: str) -> dict[str, Any]:
    """The options a model takes, with their defaults."""
    _, backbone = _lookup(name)
    params = list(inspect.signature(backbone.__init__).parameters.values())[3:]  # self, in_dim, task_names
    return {p.name: p.default for p in params} | _TOWER_OPTIONS


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming any option the model does not take, with the allowed ones."""
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {unknown}; allowed: {sorted(allowed)}")


def create(name: str, schema: Schema, **options: Any) -> nn.Module:
    """Build model `name` for `schema` (sparse features need their vocab_size set)."""
    check_options(name, options)
    wrapper, backbone = _lookup(name)
    return wrapper(schema, backbone, **options)


def _lookup(name: str) -> tuple[type[nn.Module], type[Backbone]]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {list_models()}") from None


__all__ = [
    "Backbone", "BackboneOutput", "CGC", "ExtractionLevel", "MMoE", "ModelOutput", "MultiTaskModel",
    "OMoE", "PLE", "SharedBottom", "SingleTaskModels", "check_options", "create", "list_models",
    "model_options",
]
