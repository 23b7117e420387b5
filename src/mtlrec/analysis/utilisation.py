"""Expert utilisation: what each gate routes where, averaged over a data set.

For every gate, the mean weight it gives each expert over the rows, and how that weight
splits between the gate's own task's experts, the shared experts and other tasks' experts
(PLE paper, Sec. 5.3.3 studies the same).
"""

from __future__ import annotations

import pandas as pd
import torch

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


def utilisation_table(trained: TrainedModel, means: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per (gate, expert): level, gate, expert, the expert's owner relative to the
    gate (own task, shared, other task) and the mean weight."""
    experts = trained.model.backbone.gate_experts
    rows = []
    for gate, weights in means.items():
        level, _, gate_owner = gate.rpartition("/")
        for expert, weight in zip(experts[gate], weights.tolist()):
            owner = expert.split("/")[-2]
            kind = "shared" if owner == "shared" else ("own" if owner == gate_owner else "other task")
            rows.append({"level": level or "-", "gate": gate, "expert": expert, "owner": kind, "weight": weight})
    return pd.DataFrame(rows)
