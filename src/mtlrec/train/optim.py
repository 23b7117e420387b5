"""Optimizers from the config: one for every parameter, or one per parameter group."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


def matches(name: str, prefix: str) -> bool:
    """Whether parameter `name` lies under module path `prefix` anywhere in the model
    ("embedding" matches "embedding.tables.0.weight" and "nets.1.embedding.tables.0.weight")."""
    return f".{prefix}." in f".{name}."


def build_optimizers(modules: dict[str, nn.Module], config, skip=None,
                     capturable: bool = False) -> list[torch.optim.Optimizer]:
    """`modules` maps a name prefix to a module (e.g. {"": model, "weighting": weighting}).

    Without `config.optimizers`: one `config.optimizer` over everything. With it: each
    parameter goes to the first group whose `params` prefix it lies under, "rest" taking
    whatever no other group took. Parameters whose name `skip(name)` holds for are left out
    (fused embedding tables, which update themselves). `capturable`: see `make_optimizer`.
    """
    named = [(f"{prefix}.{n}" if prefix else n, p) for prefix, m in modules.items() for n, p in m.named_parameters()
             if skip is None or not skip(n)]
    if not config.optimizers:
        params = [p for _, p in named]
        return [make_optimizer(config.optimizer, params, config.scaled_lr(config.lr), config.weight_decay,
                               config.fused_optimizer, capturable)] if params else []
    groups: list[list[nn.Parameter]] = [[] for _ in config.optimizers]
    rest = next((i for i, g in enumerate(config.optimizers) if g.params == "rest"), None)
    for name, p in named:
        i = next((i for i, g in enumerate(config.optimizers) if g.params != "rest" and matches(name, g.params)), rest)
        if i is None:
            raise ValueError(f"train.optimizers: parameter {name!r} is in no group; add a group with params: rest")
        groups[i].append(p)
    for group, params in zip(config.optimizers, groups):
        if not params:
            raise ValueError(f"train.optimizers: group {group.params!r} matches no parameter")
    return [make_optimizer(g.optimizer, params, config.scaled_lr(g.lr), g.weight_decay, config.fused_optimizer,
                           capturable) for g, params in zip(config.optimizers, groups)]


def make_optimizer(name: str, params, lr: float, weight_decay: float, fused: bool,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """`fused`: Adam / AdamW / SGD / Adagrad update all parameters in one fused kernel
    (torch's `fused=True`) instead of a loop over parameter tensors. `capturable` (Adam and
    AdamW, on CUDA): a step a CUDA graph can record: fused, its step count and lr tensors on
    the device (the lr a schedule writes into, `LearningRates.set`)."""
    params = list(params)
    options = {"lr": lr, "weight_decay": weight_decay}
    if fused or capturable:
        options["fused"] = True
    if capturable:
        if name not in ("adam", "adamw"):
            raise ValueError(f"optimizer {name!r} cannot step inside a CUDA graph: adam or adamw")
        options |= {"capturable": True, "lr": torch.tensor(lr, device=params[0].device)}
    return OPTIMIZERS[name](params, **options)
