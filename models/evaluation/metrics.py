"""CTR metrics and their intervals: AUC, GAUC, LogLoss; bootstrap over users (clusters of rows) or rows, and
intervals over seeds. Rows of one user are not independent (about 300 users make the 10,003 test rows of
ML-100k), so every interval of a CTR comparison resamples users.

All functions take numpy arrays: y (N,) in {0, 1}, p (N,) predicted click probabilities, groups (N,) user
keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties get the average rank); nan when one class is missing."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions, over users with both labels."""
    order = np.argsort(groups, kind="mergesort")
    g, y, p = np.asarray(groups)[order], np.asarray(y)[order], np.asarray(p)[order]
    _, starts = np.unique(g, return_index=True)
    bounds = np.append(starts, len(g))
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yy = y[a:b]
        if 0 < yy.sum() < len(yy):
            total += auc(yy, p[a:b]) * len(yy)
            weight += len(yy)
    return total / weight if weight else float("nan")


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def resamples(n: int, n_boot: int, seed: int = 0, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """`n_boot` bootstrap draws of row indices 0..n-1: rows, or whole groups (users) with all their rows."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    k = len(members)
    return [np.concatenate([members[g] for g in rng.integers(0, k, k)]) for _ in range(n_boot)]


def bootstrap_interval(
    stat: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> Interval:
    """Percentile interval of `stat(idx)` over `n_boot` resamples of row indices 0..n-1 (stat(arange) =
    mean); with `groups` (N,), whole groups are resampled (a cluster bootstrap)."""
    nan = float("nan")
    if n == 0:
        return Interval(nan, nan, nan)
    values = np.array([stat(idx) for idx in resamples(n, n_boot, seed, groups)])
    values = values[~np.isnan(values)]
    alpha = (1 - level) / 2
    point = stat(np.arange(n))
    if len(values) == 0:
        return Interval(point, nan, nan)
    return Interval(point, float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))


def seed_interval(values: list[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Mean and a t interval over independent seeds (at least 2)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Interval(mean, mean - half, mean + half)


def seed_mean_auc(y: np.ndarray, preds: np.ndarray) -> Callable[[np.ndarray], float]:
    """stat(idx) = mean over seeds of AUC on rows idx; preds (S, N)."""
    return lambda idx: float(np.mean([auc(y[idx], p[idx]) for p in preds]))


def paired_auc_difference(
    y: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Interval:
    """AUC(a) - AUC(b), each averaged over seeds (preds (S, N)), with a paired bootstrap interval over rows,
    or over users when `groups` is given."""
    fa, fb = seed_mean_auc(y, preds_a), seed_mean_auc(y, preds_b)
    return bootstrap_interval(lambda idx: fa(idx) - fb(idx), len(y), n_boot, seed, groups=groups)


def user_weights(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) float32 row weights of `n_boot` user resamples: each row counts as often as its user was
    drawn. The same draws as `resamples(..., groups=groups)` would make, as weights instead of indices, so
    that many metrics over one set of resamples are a few matrix products."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    k = int(inverse.max()) + 1 if len(inverse) else 0
    rng = np.random.default_rng(seed)
    draws = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(n_boot)])  # (B, U)
    return draws[:, inverse].astype(np.float32)


def weighted_aucs(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under each row of `weights` (B, N) -> (B,): a positive outranks the negatives below it, and half
    of those tied with it; nan where a resample has one class only."""
    order = np.argsort(p, kind="mergesort")
    sorted_p, pos = np.asarray(p)[order], np.asarray(y)[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])  # tie blocks
    w = weights[:, order]
    pos_w = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)  # (B, G)
    neg_w = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    total = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos_w * (below + 0.5 * neg_w)).sum(axis=1) / total, np.nan)


def row_logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))
