"""The model zoo and its registry: `create("ple", schema, **options)`, `list_models()`.

Every model takes sparse ids `[B, S]` and dense values `[B, D]` and returns
`ModelOutput(logits [B, T], gates)`. Options are the backbone's keyword arguments (see each
class's docstring) plus the towers' `tower_hidden` and `tower_dropout`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from mtlrec.models.aitm import AITM
from mtlrec.models.base import Backbone, BackboneOutput, ModelOutput, MultiTaskModel, SingleTaskModels
from mtlrec.models.cross_stitch import CrossStitch
from mtlrec.models.esmm import ESMM
from mtlrec.models.moe import MMoE, OMoE
from mtlrec.models.ple import CGC, PLE, AdaTT, ExtractionLevel
from mtlrec.models.separate import AsymmetricSharing, SeparateBottoms
from mtlrec.models.shared_bottom import SharedBottom
from mtlrec.schema import Schema

# name -> (model class, backbone). single_task: one independent shared-bottom network per task.
_MODELS: dict[str, tuple[type[nn.Module], type[Backbone]]] = {
    "single_task": (SingleTaskModels, SharedBottom),
    "shared_bottom": (MultiTaskModel, SharedBottom),
    "asymmetric": (MultiTaskModel, AsymmetricSharing),
    "cross_stitch": (MultiTaskModel, CrossStitch),
    "omoe": (MultiTaskModel, OMoE),
    "mmoe": (MultiTaskModel, MMoE),
    "cgc": (MultiTaskModel, CGC),
    "ple": (MultiTaskModel, PLE),
    "adatt": (MultiTaskModel, AdaTT),
    "esmm": (ESMM, SeparateBottoms),
    "aitm": (AITM, SeparateBottoms),
}

SUMMARIES = {
    "single_task": "one independent network per task (the baseline for MTL gain)",
    "shared_bottom": "one MLP shared by all tasks, a tower per task (Caruana 1997)",
    "asymmetric": "one MLP per task; the others also read a source task's output, detached",
    "cross_stitch": "one MLP column per task, mixed by learned T x T units after each layer (Misra et al. 2016)",
    "omoe": "experts mixed by one gate for all tasks (Ma et al. 2018)",
    "mmoe": "experts mixed by one gate per task (Ma et al. 2018)",
    "cgc": "task-specific and shared experts, each task's gate over its own and the shared (Tang et al. 2020)",
    "ple": "stacked CGC levels with a shared gate on all but the last (Tang et al. 2020)",
    "adatt": "task expert levels, each task fusing all experts plus its own native ones (Li et al. 2023)",
    "esmm": "pCTCVR = pCTR x pCVR over the entire impression space (Ma et al. 2018)",
    "aitm": "a funnel of tasks passing information forward, with a calibrator loss (Xi et al. 2021)",
}


def list_models() -> list[str]:
    return list(_MODELS)


def model_options(name: str) -> dict[str, Any]:
    """The options a model takes, with their defaults: its backbone's, then its own (towers, ...)."""
    wrapper, backbone = _lookup(name)
    own = MultiTaskModel if wrapper is SingleTaskModels else wrapper
    found = {}
    for cls, skip in ((backbone, 3), (own, 3)):  # self, in_dim, task_names / self, schema, backbone
        for p in list(inspect.signature(cls.__init__).parameters.values())[skip:]:
            if p.kind is not p.VAR_KEYWORD:
                found[p.name] = p.default
    return found


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
    "AITM", "AdaTT", "AsymmetricSharing", "Backbone", "BackboneOutput", "CGC", "CrossStitch", "ESMM",
    "ExtractionLevel", "MMoE", "ModelOutput", "MultiTaskModel", "OMoE", "PLE", "SeparateBottoms",
    "SharedBottom", "SingleTaskModels", "check_options", "create", "list_models", "model_options",
]
