"""Synthetic multi-task data with a controlled task correlation (Ma et al., KDD 2018, Sec. 3.2).

1. Orthonormal u_1, ..., u_T in R^d.
2. w_1 = c u_1 and, for k > 1, w_k = c (p u_1 + sqrt(1 - p^2) u_k): the cosine between w_1 and
   w_k is p (the paper's two-task case; between w_j and w_k, j, k > 1, it is p^2).
3. x ~ N(0, I_d).
4. y_k = w_k.x + sum_{i=1..m} sin(alpha_i w_k.x + beta_i) + eps_k, eps_k ~ N(0, noise).
A binary task reports 1[y_k > median(y_k)], so binary and regression tasks mix in one set.

The paper calls alpha_i, beta_i "given parameters"; here they are drawn once per seed from
N(0, 1), which keeps the sine terms visibly non-linear. Everything is deterministic per seed.

Optional behaviour history (`history`, after DIN's motivation, Zhou et al., KDD 2018: only
the part of a user's history related to the candidate item matters):
5. Items 0..I-1 fall into C clusters, item i in cluster i mod C. Each row has interests
   pi ~ Dirichlet(a 1_C); its history is n ~ U{min_length..max_length} items, each from a
   cluster drawn from pi and uniform within it; its target `item` comes from a cluster drawn
   from pi with probability q, else from a uniform cluster.
6. overlap = share of the history's items in the target item's cluster, in [0, 1], and
   y_k += strength * overlap for the one task k = `history.task` (before the binary split).
The history is drawn from its own random stream, so every other column (and every other
task's label) is the same with history on or off.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from mtlrec.schema import (
    Attention,
    ConfigBlock,
    DenseFeature,
    Schema,
    SparseFeature,
    Task,
)


class HistoryConfig(ConfigBlock):
    """A target item `item` and a list `history` of items sharing its embedding table; the
    overlap between the two drives task y<task> (module docstring, steps 5-6)."""

    items: int = Field(200, ge=2, description="I, item ids 0..I-1; item i is in cluster i mod C")
    clusters: int = Field(20, ge=2, description="C, latent item clusters")
    min_length: int = Field(1, ge=1, description="shortest history")
    max_length: int = Field(20, ge=1, description="longest history (the feature's max_length)")
    concentration: float = Field(0.1, gt=0.0, description="a, Dirichlet concentration of a row's interests: "
                                                          "small a, few clusters per row")
    on_interest: float = Field(0.5, ge=0.0, le=1.0, description="q, chance the target item follows the interests")
    task: int = Field(1, ge=1, description="the task (y<task>) the overlap drives")
    strength: float = Field(4.0, description="added to that task's y times the overlap")
    pooling: Literal["none", "sum", "mean", "max", "attention"] = Field(
        "mean", description="how the model pools `history`; none: the column is generated but not a feature")
    softmax: bool = Field(False, description="pooling attention: normalise the scores over the list "
                                             "(else DIN's raw scores)")
    embedding_dim: int = Field(8, ge=1, description="of the shared item table")

    @model_validator(mode="after")
    def _check(self) -> HistoryConfig:
        if self.min_length > self.max_length:
            raise ValueError("history.min_length cannot exceed history.max_length")
        if self.clusters > self.items:
            raise ValueError("history.clusters cannot exceed history.items")
        return self


class SyntheticConfig(ConfigBlock):
    rows: int = Field(20_000, ge=1, description="rows generated (before the train/valid/test split)")
    dim: int = Field(100, ge=1, description="d, input dimension")
    correlation: float = Field(0.5, ge=-1.0, le=1.0, description="p, cosine between w_1 and w_k")
    scale: float = Field(1.0, description="c")
    sin_terms: int = Field(10, ge=0, description="m")
    noise: float = Field(0.01, ge=0.0, description="variance of eps")
    task_types: list[Literal["binary", "regression"]] = Field(
        ["regression", "regression"], min_length=1, description="the two kinds this generator makes")
    sparse_features: int = Field(0, ge=0, description="first n input dims given as bucket ids")
    buckets: int = Field(10, ge=2, description="equal-frequency buckets of each sparse dim")
    seed: int | None = Field(None, description="defaults to the experiment seed")
    history: HistoryConfig | None = Field(None, description="add a target item and a history driving one task")

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if len(self.task_types) > self.dim:
            raise ValueError(f"{len(self.task_types)} tasks need dim >= {len(self.task_types)}")
        if self.sparse_features > self.dim:
            raise ValueError("sparse_features cannot exceed dim")
        if self.history is not None and self.history.task > len(self.task_types):
            raise ValueError(f"history.task {self.history.task}: there are {len(self.task_types)} tasks")
        return self


def synthetic_schema(config: SyntheticConfig) -> Schema:
    """Columns `c0..` (sparse), `x..` (dense), tasks `y1..yT`; with history also `item`
    and (unless its pooling is none) `history`, both reading the table `item`."""
    n = config.sparse_features
    sparse = [SparseFeature(name=f"c{i}") for i in range(n)]
    h = config.history
    if h is not None:
        sparse.append(SparseFeature(name="item", embedding="item", embedding_dim=h.embedding_dim))
        if h.pooling != "none":
            attention = Attention(target="item", softmax=h.softmax) if h.pooling == "attention" else None
            sparse.append(SparseFeature(name="history", embedding="item", embedding_dim=h.embedding_dim,
                                        multi_valued=True, max_length=h.max_length, pooling=h.pooling,
                                        attention=attention))
    return Schema(
        sparse=sparse,
        dense=[DenseFeature(name=f"x{i}") for i in range(n, config.dim)],
        tasks=[Task(name=f"y{k + 1}", type=t) for k, t in enumerate(config.task_types)],
    )


def make_synthetic(config: SyntheticConfig, seed: int = 0) -> pd.DataFrame:
    """Generate the table described in the module docstring: `rows` x (d inputs + T labels),
    with history also `item` (int64) and `history` (an int64 array per row) before the labels."""
    seed = config.seed if config.seed is not None else seed
    rng = np.random.default_rng(seed)
    d, t, c, p = config.dim, len(config.task_types), config.scale, config.correlation
    u, _ = np.linalg.qr(rng.standard_normal((d, t)))  # [d, T], orthonormal columns
    w = c * u
    w[:, 1:] = c * (p * u[:, :1] + np.sqrt(1.0 - p * p) * u[:, 1:])
    alpha = rng.standard_normal(config.sin_terms)
    beta = rng.standard_normal(config.sin_terms)
    x = rng.standard_normal((config.rows, d))
    z = x @ w  # [N, T]
    y = z + np.sin(z[:, :, None] * alpha + beta).sum(axis=2)
    y += rng.normal(0.0, np.sqrt(config.noise), size=y.shape)

    columns: dict[str, np.ndarray] = {}
    n_sparse = config.sparse_features
    for i in range(n_sparse):
        edges = np.quantile(x[:, i], np.linspace(0, 1, config.buckets + 1)[1:-1])
        columns[f"c{i}"] = np.searchsorted(edges, x[:, i])
    for i in range(n_sparse, d):
        columns[f"x{i}"] = x[:, i].astype(np.float32)
    h = config.history
    if h is not None:
        item, history, overlap = make_history(h, config.rows, np.random.default_rng([seed, 1]))
        y[:, h.task - 1] += h.strength * overlap
        columns["item"], columns["history"] = item, history
    for k, kind in enumerate(config.task_types):
        label = y[:, k]
        columns[f"y{k + 1}"] = (label > np.median(label)).astype(np.float32) if kind == "binary" else label
    return pd.DataFrame(columns)


def make_history(config: HistoryConfig, rows: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 5-6 of the module docstring for N = `rows`: (target item `[N]` int64, history
    `[N]` object, row i an int64 array of its n_i items, overlap `[N]` float64 in [0, 1])."""
    n, length, c = rows, config.max_length, config.clusters
    interests = rng.dirichlet(np.full(c, config.concentration), size=n)  # [N, C]
    lengths = rng.integers(config.min_length, length + 1, size=n)  # [N]
    drawn = _categorical(interests, rng.random((n, length)))  # [N, L] clusters; row i keeps its first n_i
    on_interest = rng.random(n) < config.on_interest
    target = np.where(on_interest, _categorical(interests, rng.random((n, 1)))[:, 0], rng.integers(0, c, size=n))
    kept = np.arange(length) < lengths[:, None]  # [N, L]
    overlap = ((drawn == target[:, None]) & kept).sum(axis=1) / lengths
    item = _item_in(target, config, rng)
    elements = _item_in(drawn[kept], config, rng)  # [sum n_i], rows laid end to end
    history = np.empty(n, dtype=object)
    history[:] = np.split(elements, np.cumsum(lengths)[:-1])
    return item, history, overlap


def _categorical(probabilities: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: `[N, K]` categories, row i of `uniform` `[N, K]` (in [0, 1))
    against row i of `probabilities` `[N, C]`. One searchsorted for all rows: row i's CDF
    is shifted by i, so the rows' CDFs lie one after another in one sorted array."""
    n, c = probabilities.shape
    cdf = np.cumsum(probabilities, axis=1)
    cdf[:, -1] = 1.0  # no draw past the last category by rounding
    shift = np.arange(n)[:, None]
    found = np.searchsorted((cdf + shift).ravel(), (uniform + shift).ravel(), side="right")
    return np.minimum(found.reshape(uniform.shape) - shift * c, c - 1)


def _item_in(clusters: np.ndarray, config: HistoryConfig, rng: np.random.Generator) -> np.ndarray:
    """A uniform item of each given cluster (same shape, int64): cluster k holds k, k + C, ... < I."""
    c = config.clusters
    size = (config.items - clusters + c - 1) // c  # items in each cluster
    return clusters + c * rng.integers(0, size)
