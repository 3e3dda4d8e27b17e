"""A/B statistics: DeLong against the O(m n) definition, paired intervals, lift, SRM, bids, log analysis."""

from __future__ import annotations

import numpy as np
import pytest

from llmfeat.config import load_settings
from llmfeat.models.evaluation.ab_stats import (
    Arm,
    delong_test,
    item_bid,
    lift_interval,
    paired_differences,
    srm_test,
    unit_hash,
)
from llmfeat.models.evaluation.metrics import auc
from llmfeat.spark_jobs.abtest import analyze_events

pytestmark = pytest.mark.unit


def slow_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Textbook DeLong: placement values from all positive x negative pairs."""
    pos, neg = y == 1, y == 0

    def psi(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cmp = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return cmp.mean(axis=1), cmp.mean(axis=0)

    (va10, va01), (vb10, vb01) = psi(a), psi(b)
    s10, s01 = np.cov(np.stack([va10, vb10])), np.cov(np.stack([va01, vb01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum() + (
        s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
    ) / neg.sum()
    return auc(y, a) - auc(y, b), float(np.sqrt(var))


def test_delong_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.4).astype(int)
    a = np.round(y + rng.normal(size=300), 1)  # rounded: ties
    b = np.round(0.5 * y + rng.normal(size=300), 1)
    diff, se, p = delong_test(y, a, b)
    ref_diff, ref_se = slow_delong(y, a, b)
    assert diff == pytest.approx(ref_diff) and se == pytest.approx(ref_se, rel=1e-6)
    assert 0 <= p < 0.05  # a carries twice the signal
    assert delong_test(y, a, a)[2] == 1.0


def test_paired_intervals_cover_the_point_and_detect_a_real_difference() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.5).astype(float)
    users = rng.integers(0, 40, 400)
    weak = 1 / (1 + np.exp(-(0.3 * (2 * y - 1) + rng.normal(size=400))))
    strong = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(size=400))))
    diff = paired_differences(y, weak, strong, users, n_boot=200)
    assert diff["auc"].low > 0 and diff["gauc"].low > 0 and diff["logloss"].high < 0
    assert diff["auc_p"].mean < 0.05  # the paired test over user resamples
    for name in ("auc", "gauc", "logloss"):
        assert diff[name].low <= diff[name].mean <= diff[name].high


def test_intervals_resampling_users_are_wider_when_rows_of_a_user_move_together() -> None:
    from llmfeat.models.evaluation.metrics import bootstrap_interval

    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(30), 50)  # 30 users, 50 rows each
    taste = rng.normal(size=30)[users]  # one user's rows share a click rate...
    y = (rng.random(1500) < 1 / (1 + np.exp(-2 * taste))).astype(float)
    offset = rng.normal(size=30)[users]  # ... and a score offset of the model
    p = 1 / (1 + np.exp(-(0.5 * (2 * y - 1) + 1.5 * offset + 0.3 * rng.normal(size=1500))))
    rows = bootstrap_interval(lambda i: auc(y[i], p[i]), 1500, 300)
    clustered = bootstrap_interval(lambda i: auc(y[i], p[i]), 1500, 300, groups=users)
    assert clustered.high - clustered.low > 1.2 * (rows.high - rows.low)


def test_lift_interval_and_srm() -> None:
    rng = np.random.default_rng(2)
    imps = np.full(2000, 3.0)
    a = Arm(imps, rng.binomial(3, 0.10, 2000).astype(float), np.zeros(2000))
    b = Arm(imps, rng.binomial(3, 0.13, 2000).astype(float), np.zeros(2000))
    lift = lift_interval(a, b, "clicks", n_boot=300)
    assert lift.low > 0 and lift.low < 0.3 < lift.high
    assert srm_test([5000, 5000], [0.5, 0.5]) > 0.9
    assert srm_test([5300, 4700], [0.5, 0.5]) < 1e-6
    assert srm_test([7000, 3000], [0.7, 0.3]) > 0.9


def test_bids_are_stable_and_in_range() -> None:
    bids = [item_bid(str(i), 0.5, 1.5) for i in range(200)]
    assert all(0.5 <= b < 1.5 for b in bids) and item_bid("7", 0.5, 1.5) == bids[7]
    assert 0.4 < np.mean([unit_hash(str(i)) for i in range(2000)]) < 0.6


def test_analyze_events_joins_clicks_on_the_shown_items() -> None:
    settings = load_settings("tiny", ["abtest.n_boot=50", "abtest.bid_min=1", "abtest.bid_max=1"])
    events = []
    for r, (user, arm, shown) in enumerate(
        [("u1", "champion", ["i1"]), ("u2", "challenger", ["i1"]), ("u3", "challenger", ["i2"])]
    ):
        version = "1" if arm == "champion" else "2"
        events.append(
            {"type": "impression", "request_id": f"r{r}", "user_id": user, "arm": arm, "alias": arm,
             "model": "m", "model_version": version, "items": shown, "scores": [0.5], "cold_user": False,
             "cold_items": []}
        )  # fmt: skip
    events += [
        {"type": "click", "request_id": "r1", "item_id": "i1"},
        {"type": "click", "request_id": "r0", "item_id": "i2"},  # not shown in r0: ignored
    ]
    check_two_arms(analyze_events(events, settings))


def test_analyze_events_reads_logs_with_one_line_per_ranked_item() -> None:
    settings = load_settings(
        "tiny", ["serving.slots=1", "abtest.n_boot=50", "abtest.bid_min=1", "abtest.bid_max=1"]
    )
    events = []
    for r, (user, arm) in enumerate([("u1", "champion"), ("u2", "challenger"), ("u3", "challenger")]):
        version = "1" if arm == "champion" else "2"
        for rank, item in enumerate(["i1", "i2"]):
            events.append(
                {"type": "impression", "request_id": f"r{r}", "user_id": user, "arm": arm, "alias": arm,
                 "model": "m", "model_version": version, "item_id": item, "rank": rank, "score": 0.5}
            )  # fmt: skip
    events += [
        {"type": "click", "request_id": "r1", "item_id": "i1"},
        {"type": "click", "request_id": "r0", "item_id": "i2"},  # not shown (rank 1 >= 1 slot): ignored
    ]
    check_two_arms(analyze_events(events, settings))


def check_two_arms(result) -> None:  # type: ignore[no-untyped-def]
    rows = result.per_arm.set_index("arm")
    assert rows.loc["champion", "impressions"] == 1 and rows.loc["champion", "clicks"] == 0
    assert rows.loc["challenger", "impressions"] == 2 and rows.loc["challenger", "clicks"] == 1
    assert rows.loc["challenger", "ctr"] == 0.5 and rows.loc["challenger", "ecpm"] == 500.0
    assert result.versions == {"champion": "1", "challenger": "2"}
