"""Metrics with 95% bootstrap intervals for one CTR model, and its ROC and calibration plots.

Every metric comes from models/evaluation/metrics.py (AUC, GAUC, LogLoss, bootstrap_interval); subsets: all
rows, warm users (train-period history) and cold users, as docs/methods.md asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llmfeat.models.evaluation.metrics import Interval, auc, bootstrap_interval, gauc, logloss

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("auc", "gauc", "logloss")


def metric_intervals(
    y: np.ndarray, p: np.ndarray, users: np.ndarray, n_boot: int, seed: int = 0
) -> dict[str, Interval]:
    """AUC, GAUC, LogLoss with percentile intervals over `n_boot` resamples of the users (all their rows)."""
    funcs = {
        "auc": lambda i: auc(y[i], p[i]),
        "gauc": lambda i: gauc(y[i], p[i], users[i]),
        "logloss": lambda i: logloss(y[i], p[i]),
    }
    return {name: bootstrap_interval(f, len(y), n_boot, seed, groups=users) for name, f in funcs.items()}


def flat_metrics(prefix: str, intervals: dict[str, Interval]) -> dict[str, float]:
    """{"test_auc": .., "test_auc_low": .., "test_auc_high": ..} for mlflow.log_metrics (NaN dropped)."""
    out = {}
    for name, iv in intervals.items():
        for suffix, value in (("", iv.mean), ("_low", iv.low), ("_high", iv.high)):
            if np.isfinite(value):
                out[f"{prefix}_{name}{suffix}"] = float(value)
    return out


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="mergesort")
    y_sorted = np.asarray(y)[order].astype(float)
    tps, fps = np.cumsum(y_sorted), np.cumsum(1 - y_sorted)
    last = np.r_[np.flatnonzero(np.diff(np.asarray(p)[order])), len(y) - 1]  # end of each tie block
    tpr = np.r_[0.0, tps[last] / max(tps[-1], 1.0)]
    fpr = np.r_[0.0, fps[last] / max(fps[-1], 1.0)]
    return fpr, tpr


def calibration_bins(
    y: np.ndarray, p: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed rate, count) per equal-width probability bin that has rows."""
    idx = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    pred = np.bincount(idx, weights=p, minlength=bins)
    obs = np.bincount(idx, weights=y, minlength=bins)
    has = count > 0
    return pred[has] / count[has], obs[has] / count[has], count[has]


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """curves: label -> (y, p)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for label, (y, p) in curves.items():
        fpr, tpr = roc_points(y, p)
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc(y, p):.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return fig


def calibration_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for label, (y, p) in curves.items():
        pred, obs, _ = calibration_bins(y, p)
        ax.plot(pred, obs, marker="o", label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="mean predicted click probability", ylabel="observed click rate", title=title)
    ax.legend(loc="upper left")
    return fig
