"""Ranking with all tasks at once, and offline ranking metrics.

The fused score (PLE paper, Eq. 1):  score = prod_k p_k^{w_k} * f(item),
with p_k the task predictions (probabilities; a regression task's value, floored at a small
positive number; a multiclass task's chosen class probability or expected class value, as
its options say: `TaskKind.rank_value`), w_k the task weights and f a transform of an item
feature (e.g. video length), all from the config's `rank` block. Computed in log space. A
row whose item value is missing (null, NaN, an empty cell) gets f(item) = 1: its score is
the task product alone.

Offline metrics per group (e.g. per user or request):
- GAUC of task k: the AUC within each group that has both labels, averaged with the groups'
  row counts as weights (Zhou et al., KDD 2018, "Deep Interest Network", Eq. 5 uses
  impressions as weights);
- NDCG@k of the fused score, relevance = sum_k r_k y_k over the tasks' labels (a multiclass
  label read as its prediction is: [y = the chosen class], or the class value v_y), averaged
  over the groups with any relevant row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrec.config import RankConfig
from mtlrec.schema import Schema
from mtlrec.tasks import kind_of

EPS = 1e-12


def rank_weights(config: RankConfig, task_names: list[str]) -> dict[str, float]:
    """w_k by task: `rank.weights`, or 1 for every task when it names none."""
    return dict(config.weights) if config.weights else {t: 1.0 for t in task_names}


def relevance_weights(config: RankConfig, task_names: list[str]) -> dict[str, float]:
    """r_k by task, of NDCG's relevance sum_k r_k y_k: `rank.relevance`, else the fused score's w_k."""
    return dict(config.relevance) or rank_weights(config, task_names)


def relevance(weights: dict[str, float], kinds: dict, labels: dict[str, np.ndarray]) -> np.ndarray:
    """sum_k r_k y_k per row `[N]`: `weights` r_k by task, `kinds` the tasks' `TaskKind` by name,
    `labels` y_k by task (NaN outside the task's space, counted 0; a multiclass label as its
    kind ranks it)."""
    return np.asarray(sum(r * np.nan_to_num(kinds[t].rank_label(labels[t])) for t, r in weights.items()), dtype=float)


def item_factor(values: np.ndarray, transform: str, power: float) -> np.ndarray:
    """f(item) per row: transform(value) ** power, floored at EPS before the power; 1 where missing (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    if transform == "log1p":
        values = np.log1p(np.maximum(values, 0.0))
    elif transform == "sqrt":
        values = np.sqrt(np.maximum(values, 0.0))
    return np.where(missing, 1.0, np.maximum(values, EPS) ** power)


def task_log_score(predictions: np.ndarray, task_names: list[str], weights: dict[str, float]) -> np.ndarray:
    """sum_k w_k log p_k per row (the fused score's task part, in log space; p_k floored at EPS):
    predictions `[N, T]` in `task_names` order, `weights` w_k by task name."""
    columns = {name: k for k, name in enumerate(task_names)}
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, len(task_names))
    log_score = np.zeros(len(predictions))
    for task, w in weights.items():
        log_score += w * np.log(np.maximum(predictions[:, columns[task]], EPS))
    return log_score


def fused_score_array(predictions: np.ndarray, task_names: list[str], item_values: np.ndarray | None,
                      config: RankConfig, schema: Schema) -> np.ndarray:
    """prod_k p_k^w_k * f(item) per row. predictions `[N, T]`: p_k of each task in `task_names`
    order (`TaskSet.rank_values` of the model's predictions); item_values `[N]` float (NaN:
    missing), needed when the config has `rank.item`."""
    log_score = task_log_score(predictions, task_names, rank_weights(config, schema.task_names))
    if config.item is not None:
        log_score += np.log(item_factor(item_values, config.item.transform, config.item.power))
    return np.exp(log_score)


def item_values(table: pd.DataFrame, config: RankConfig) -> np.ndarray | None:
    """The `rank.item` column as float64, NaN where empty; None without `rank.item`."""
    if config.item is None:
        return None
    name = config.item.column
    if name not in table.columns:
        raise ValueError(f"rank.item.column {name!r} is not in the table")
    column = table[name]
    values = pd.to_numeric(column, errors="coerce")
    bad = (values.isna() & column.notna()).to_numpy()
    if bad.any():
        row = bad.nonzero()[0][0]
        raise ValueError(f"rank.item.column {name!r} must be numeric: row {table.index[row]!r} "
                         f"holds {column.iloc[row]!r}")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def fused_score(predictions: pd.DataFrame, table: pd.DataFrame, config: RankConfig, schema: Schema) -> np.ndarray:
    """prod_k p_k^w_k * f(item) for every row. predictions: as `TrainedModel.predict` gives them
    (one column per task, a multiclass task's one per class); only the weighted tasks' are read."""
    kinds = {t.name: t.kind for t in schema.tasks}
    names = list(rank_weights(config, schema.task_names))
    values = np.stack([kinds[n].rank_value(predictions[kinds[n].output_names(n)].to_numpy(dtype=np.float64))
                       for n in names], axis=1)
    return fused_score_array(values, names, item_values(table, config), config, schema)


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Row-count-weighted mean of the per-group AUCs over groups with both labels; NaN if none.
    Each group's AUC is the Mann-Whitney statistic of its scores' average ranks (ties count
    one half: scikit-learn's roc_auc_score within the group, tested), all groups at once."""
    codes, _ = pd.factorize(groups)
    positive = np.asarray(labels).astype(bool)
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).groupby(codes).rank(method="average").to_numpy()
    rows = np.bincount(codes)
    pos = np.bincount(codes, weights=positive)
    neg = rows - pos
    rank_sum = np.bincount(codes, weights=np.where(positive, ranks, 0.0))
    both = (pos > 0) & (neg > 0)
    if not both.any():
        return float("nan")
    per_group = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return float(np.average(per_group, weights=rows[both]))


def ndcg_at_k(relevance: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Mean NDCG@k over groups with a relevant row (gain 2^rel - 1, discount log2(rank + 1))."""
    values = []
    for idx in _group_indices(groups):
        rel = relevance[idx]
        ideal = _dcg(np.sort(rel)[::-1][:k])
        if ideal > 0:
            order = np.argsort(-scores[idx], kind="stable")[:k]
            values.append(_dcg(rel[order]) / ideal)
    return float(np.mean(values)) if values else float("nan")


def _dcg(rel: np.ndarray) -> float:
    return float(((2.0**rel - 1) / np.log2(np.arange(2, rel.size + 2))).sum())


def _group_indices(groups: np.ndarray) -> list[np.ndarray]:
    codes, _ = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds)


def rank_table(trained, table: pd.DataFrame, group_by: str, top_k: int
               ) -> tuple[pd.DataFrame, dict[str, float], list[str]]:
    """Score every row, keep each group's top k by the fused score, and compute the offline
    metrics on the table's labels, computed as training computes them (label column, `values`
    map or `expression`; rows outside a task's space left out). Returns (top rows, metrics,
    notes): a note says which metric could not be computed and why. An empty `group_by` cell
    is an error; an empty `rank.item` cell gives f(item) = 1."""
    if group_by not in table.columns:
        raise ValueError(f"--group-by: no column {group_by!r} in the table")
    empty = table[group_by].isna().to_numpy()
    if empty.any():
        raise ValueError(f"--group-by column {group_by!r} is empty in {int(empty.sum())} row(s), the first "
                         f"row {table.index[empty.nonzero()[0][0]]!r}; every row needs a group")
    schema, config = trained.schema, trained.config.rank
    predictions = trained.predict(table)
    scored = table.assign(**{f"p_{c}": predictions[c].to_numpy() for c in trained.tasks.output_names})
    scored["score"] = fused_score(predictions, table, config, schema)
    scored["rank"] = scored.groupby(group_by, sort=False)["score"].rank(ascending=False, method="first").astype(int)
    top = scored[scored["rank"] <= top_k].sort_values([group_by, "rank"], kind="stable")
    metrics: dict[str, float] = {}
    notes: list[str] = []
    groups = table[group_by].to_numpy()
    labels = trained.encoder.task_labels(table)
    unlabelled = [t for t in schema.task_names if t not in labels]
    if unlabelled:
        notes.append(f"no labels for task(s) {unlabelled}: the table lacks the columns their labels are computed from")
    for task in schema.tasks:
        if task.name in labels and kind_of(task.type).probability:  # GAUC of tasks whose labels are 0/1
            y = labels[task.name]
            keep = ~np.isnan(y)
            metrics[f"gauc/{task.name}"] = gauc(y[keep], predictions[task.name].to_numpy()[keep], groups[keep])
    weights = relevance_weights(config, schema.task_names)
    missing = [t for t in weights if t not in labels]
    if missing:
        notes.append(f"ndcg@{top_k} not computed: the relevance sum_k r_k y_k needs the labels of {missing} "
                     "(set rank.relevance to the tasks the table labels)")
    else:
        kinds = {t.name: t.kind for t in schema.tasks}
        metrics[f"ndcg@{top_k}"] = ndcg_at_k(relevance(weights, kinds, labels), scored["score"].to_numpy(), groups, top_k)
    return top, metrics, notes
