"""A/B statistics: paired bootstrap intervals, DeLong's test, lift with an interval, sample-ratio mismatch,
eCPM under a stated bid rule.

Notation: N scored rows (offline), R requests, U users (online, the unit of randomisation).

- Offline (two models, the same rows): `paired_differences` resamples users (each with all their rows) once
  per replicate and scores both models on the same resample, so the interval of the difference is paired and
  respects that one user's rows are correlated; its bootstrap p-value is the test the promotion gate uses.
  `delong_test`, the analytic test for correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988; fast
  midrank form of Sun & Xu 2014), treats rows as independent: printed for reference only.
- Online (two arms, different users): `lift_interval` resamples *users* within each arm (users are what the
  hash assigns), so correlated impressions of one user stay together.
- `srm_test`: chi-square goodness of fit of the users per arm against the configured split.
- eCPM: revenue per 1000 impressions, where a click on item j pays its cost-per-click bid `item_bid(j)`: a
  deterministic stand-in for an auction price, bid_min + (bid_max - bid_min) * u(j), u(j) in [0, 1) from a
  stable hash of the item id. It is an assumption (ML-100k has no prices), stated wherever eCPM is printed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from llmfeat.models.evaluation.metrics import Interval, auc, gauc, logloss, resamples


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    return stats.rankdata(x, method="average")


def delong_test(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> tuple[float, float, float]:
    """(AUC(a) - AUC(b), its standard error, two-sided p-value) for two scores of the same rows."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.asarray([p_a, p_b])[:, y], np.asarray([p_a, p_b])[:, ~y]  # (2, m), (2, n)
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    tx = np.array([_midranks(s) for s in pos])  # (2, m) ranks among positives
    ty = np.array([_midranks(s) for s in neg])  # (2, n)
    tz = np.array([_midranks(np.r_[a, b]) for a, b in zip(pos, neg, strict=True)])  # (2, m + n)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n  # (2,)
    v01 = (tz[:, :m] - tx) / n  # (2, m) structural components
    v10 = 1.0 - (tz[:, m:] - ty) / m  # (2, n)
    cov = np.cov(v01) / m + np.cov(v10) / n  # (2, 2)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 0:
        return diff, 0.0, 1.0 if diff == 0 else 0.0
    se = float(np.sqrt(var))
    return diff, se, float(2 * stats.norm.sf(abs(diff) / se))


def paired_differences(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    users: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """metric(b) - metric(a) for AUC, GAUC, LogLoss with paired percentile intervals over resampled users
    (b = challenger), and `auc_p`: the two-sided bootstrap p-value of the AUC difference (a paired test that
    respects users, unlike DeLong's, which treats rows as independent)."""
    metrics: dict[str, Callable[[np.ndarray], float]] = {
        "auc": lambda i: auc(y[i], p_b[i]) - auc(y[i], p_a[i]),
        "gauc": lambda i: gauc(y[i], p_b[i], users[i]) - gauc(y[i], p_a[i], users[i]),
        "logloss": lambda i: logloss(y[i], p_b[i]) - logloss(y[i], p_a[i]),
    }
    draws = resamples(len(y), n_boot, seed, groups=users)  # one set of user resamples: paired
    alpha = (1 - level) / 2
    out = {}
    for name, f in metrics.items():
        values = np.array([f(i) for i in draws])
        values = values[np.isfinite(values)]
        point = f(np.arange(len(y)))
        low, high = np.quantile(values, [alpha, 1 - alpha]) if len(values) else (np.nan, np.nan)
        out[name] = Interval(point, float(low), float(high))
        if name == "auc" and len(values):
            tail = min((values <= 0).mean(), (values >= 0).mean())
            out["auc_p"] = Interval(min(1.0, 2 * float(tail)), float("nan"), float("nan"))
    return out


@dataclass(frozen=True)
class Arm:
    """Per-user totals of one arm: impressions (U,), clicks (U,), revenue (U,)."""

    impressions: np.ndarray
    clicks: np.ndarray
    revenue: np.ndarray

    @property
    def users(self) -> int:
        return len(self.impressions)

    @property
    def ctr(self) -> float:
        return float(self.clicks.sum() / max(self.impressions.sum(), 1))

    @property
    def ecpm(self) -> float:
        return float(1000 * self.revenue.sum() / max(self.impressions.sum(), 1))


def lift_interval(
    a: Arm, b: Arm, numerator: str = "clicks", n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Relative lift rate(b) / rate(a) - 1 of rate = sum(numerator) / sum(impressions) ("clicks": CTR,
    "revenue": eCPM / 1000), with a percentile interval from resampling users within each arm."""
    rng = np.random.default_rng(seed)

    def rate(arm: Arm, idx: np.ndarray) -> float:
        imps = arm.impressions[idx].sum()
        return float(getattr(arm, numerator)[idx].sum() / imps) if imps else float("nan")

    def lift(ia: np.ndarray, ib: np.ndarray) -> float:
        ra = rate(a, ia)
        return rate(b, ib) / ra - 1 if ra > 0 else float("nan")

    point = lift(np.arange(a.users), np.arange(b.users))
    draws = [(rng.integers(0, a.users, a.users), rng.integers(0, b.users, b.users)) for _ in range(n_boot)]
    values = np.array([lift(ia, ib) for ia, ib in draws]) if a.users and b.users else np.array([])
    values = values[np.isfinite(values)]
    alpha = (1 - level) / 2
    if not len(values):
        return Interval(point, float("nan"), float("nan"))
    return Interval(point, float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))


def srm_test(counts: list[int], shares: list[float]) -> float:
    """Chi-square p-value of observed counts per arm against the expected shares (a small p: mismatch)."""
    observed = np.asarray(counts, dtype=float)
    expected = np.asarray(shares, dtype=float) / sum(shares) * observed.sum()
    if observed.sum() == 0:
        return float("nan")
    return float(stats.chisquare(observed, expected).pvalue)


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from a string (same on every machine and run)."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def item_bid(item_id: str, bid_min: float, bid_max: float) -> float:
    """The assumed cost-per-click bid of an item (see the module docstring)."""
    return bid_min + (bid_max - bid_min) * unit_hash(f"bid:{item_id}")


def paired_deltas(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, weights: np.ndarray
) -> dict[str, Interval]:
    """AUC(b) - AUC(a) and LogLoss(b) - LogLoss(a), paired, with percentile intervals over the user
    resamples `weights` (n_boot, N) of `user_weights`: `paired_differences` as matrix products, for
    ablations that compare many pairs and slices on one set of resamples."""
    from llmfeat.models.evaluation.metrics import row_logloss, weighted_aucs

    out = {}
    ones = np.ones((1, len(y)), np.float32)
    for name, f in (
        ("auc", lambda w: weighted_aucs(y, p_b, w) - weighted_aucs(y, p_a, w)),
        ("logloss", lambda w: w @ (row_logloss(y, p_b) - row_logloss(y, p_a)) / w.sum(axis=1)),
    ):
        values = np.asarray(f(weights), np.float64)
        values = values[np.isfinite(values)]
        low, high = np.quantile(values, [0.025, 0.975]) if len(values) else (np.nan, np.nan)
        out[name] = Interval(float(f(ones)[0]), float(low), float(high))
    return out
