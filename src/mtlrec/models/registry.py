"""The model registry: a model registers itself beside its class, with its typed options.

    @register_model("mmoe", MoEOptions, "experts mixed by one gate per task (Ma et al. 2018)")
    class MMoE(Backbone): ...

A variant is a line of data: the same backbone with some options fixed, e.g.
`@register_model("cgc", PLEOptions, "...", fixed={"num_levels": 1})` above `PLE`. A model
that is more than embedding -> backbone -> towers (ESMM, AITM) decorates its own
`MultiTaskModel` subclass and names the backbone it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mtlrec.models.base import Backbone, MultiTaskModel
from mtlrec.models.options import ModelOptions
from mtlrec.schema import Schema, typed_options


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what it takes."""

    name: str
    summary: str
    options: type[ModelOptions]
    backbone: type[Backbone]
    wrapper: type[nn.Module] = MultiTaskModel
    fixed: dict[str, Any] = field(default_factory=dict)  # options the variant sets for the user

    def defaults(self) -> dict[str, Any]:
        """The options a user may set, with their defaults."""
        return {name: f.default for name, f in self.options.model_fields.items() if name not in self.fixed}

    def parse(self, options: dict[str, Any]) -> ModelOptions:
        """Validate user options into the typed options; ValueError names what is wrong."""
        fixed = sorted(set(options) & set(self.fixed))
        if fixed:
            raise ValueError(f"model {self.name!r} fixes " + ", ".join(f"{k} = {self.fixed[k]!r}" for k in fixed))
        return typed_options(f"model {self.name!r}", self.options, options, sorted(self.defaults()), self.fixed)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, options: type[ModelOptions], summary: str, *, backbone: type[Backbone] | None = None,
                   wrapper: type[nn.Module] | None = None, fixed: dict[str, Any] | None = None) -> Callable:
    """Class decorator. On a `Backbone`: the model is embedding -> it -> towers (or `wrapper`).
    On a `MultiTaskModel` subclass: that class wraps `backbone`."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if issubclass(cls, Backbone):
            spec = ModelSpec(name, summary, options, cls, wrapper or MultiTaskModel, dict(fixed or {}))
        elif backbone is None:
            raise TypeError(f"register_model({name!r}) on a model class needs backbone=")
        else:
            spec = ModelSpec(name, summary, options, backbone, cls, dict(fixed or {}))
        _REGISTRY[name] = spec
        return cls

    return decorate


def spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {list_models()}") from None


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options model `name` takes, with their defaults."""
    return spec(name).defaults()


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming any unknown, fixed or ill-typed option."""
    spec(name).parse(options)


def create(name: str, schema: Schema, **options: Any) -> nn.Module:
    """Build model `name` for `schema` (sparse features need their vocab_size set).

    Example:
        >>> import torch
        >>> from mtlrec.schema import Schema, SparseFeature, DenseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="user", vocab_size=10)],
        ...                 dense=[DenseFeature(name="age")], tasks=[Task(name="click"), Task(name="like")])
        >>> model = create("ple", schema, expert_hidden=[16], tower_hidden=[8])
        >>> from mtlrec.data.features import Features
        >>> out = model(Features(torch.tensor([[3], [7]]), torch.zeros(2, 1)))
        >>> out.logits.shape
        torch.Size([2, 2])
    """
    found = spec(name)
    return found.wrapper(schema, found.backbone, found.parse(options))
