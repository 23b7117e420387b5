"""Expert utilisation: what each gate routes where, averaged over a data set.

For every gate, the mean weight it gives each expert over the rows, and how that weight
splits between the gate's own task's experts, the shared experts and other tasks' experts
(PLE paper, Sec. 5.3.3 studies the same).

For routed gates (top-k, `mtlrec.nn.routing`), also each expert's load: the fraction of rows the
gate sends to it (each row counts once per expert it keeps, so a gate's loads sum to top_k), and
the gate's imbalance, max load / mean load over its experts (1: balanced; E / k: every row sent to
the same k experts).
"""

from __future__ import annotations

import pandas as pd
import torch

from mtlrec.nn.routing import imbalance
from mtlrec.trained import TrainedModel


@torch.no_grad()
def gate_utilisation(trained: TrainedModel, table: pd.DataFrame, batch_size: int = 8192) -> dict[str, torch.Tensor]:
    """Gate name -> mean weight per expert `[experts]` over the rows of `table`."""
    data = trained.encoder.transform(table, labels=False)
    model = trained.model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in data.batches(batch_size):
        for name, weights in model(batch.features).gates.items():
            sums[name] = sums.get(name, 0) + weights.sum(0)
    if not sums:
        raise ValueError(f"model {trained.config.model.name!r} has no gates to analyse")
    return {name: total / len(data) for name, total in sums.items()}


@torch.no_grad()
def gate_load(trained: TrainedModel, table: pd.DataFrame, batch_size: int = 8192) -> dict[str, torch.Tensor]:
    """Routed gate name -> fraction of the rows of `table` it sends to each expert `[experts]`
    (the rows where its weight on the expert is not 0); empty for a model without routed gates."""
    routed = getattr(getattr(trained.model, "backbone", None), "gate_top_k", {})
    if not routed:
        return {}
    data = trained.encoder.transform(table, labels=False)
    model = trained.model.eval()
    counts: dict[str, torch.Tensor] = {}
    for batch in data.batches(batch_size):
        for name, weights in model(batch.features).gates.items():
            if name in routed:
                counts[name] = counts.get(name, 0) + (weights != 0).sum(0).double()
    return {name: total / len(data) for name, total in counts.items()}


def load_imbalance(loads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Routed gate name -> max load / mean load over its experts (1 when balanced)."""
    return {name: float(imbalance(load)) for name, load in loads.items()}


def utilisation_table(trained: TrainedModel, means: dict[str, torch.Tensor],
                      loads: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per (gate, expert): level, gate, expert, the expert's owner relative to the
    gate (own task, shared, other task) and the mean weight; given `loads` (`gate_load`), also
    the fraction of rows routed to the expert (NaN for a dense gate, which uses every expert)."""
    experts = trained.model.backbone.gate_experts
    rows = []
    for gate, weights in means.items():
        level, _, gate_owner = gate.rpartition("/")
        load = loads[gate].tolist() if loads and gate in loads else [float("nan")] * len(experts[gate])
        for expert, weight, share in zip(experts[gate], weights.tolist(), load):
            owner = expert.split("/")[-2]
            kind = "shared" if owner == "shared" else ("own" if owner == gate_owner else "other task")
            row = {"level": level or "-", "gate": gate, "expert": expert, "owner": kind, "weight": weight}
            rows.append(row if loads is None else row | {"load": share})
    return pd.DataFrame(rows)
