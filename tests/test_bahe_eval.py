"""BAHE evaluation helpers: measured processes, the daily projection, the report (no Spark, no weights)."""

from __future__ import annotations

import numpy as np
import pytest

from llmfeat.spark_jobs.bahe_eval import (
    Cost,
    Throughput,
    daily_projection,
    fill_unencoded,
    format_report,
    in_process,
)

pytestmark = pytest.mark.unit


def allocate(mib: int) -> int:
    block = np.ones(mib * 1024 * 1024, dtype=np.uint8)  # touched, so resident
    return int(block.sum() // (1024 * 1024))


def test_in_process_measures_its_own_peak_memory_and_time() -> None:
    out, seconds, peak = in_process(allocate, 300)
    assert out == 300 and seconds > 0
    assert peak >= 300  # MiB: the child's own peak, not the test runner's


def test_daily_projection_counts_tokens_and_gpu_hours() -> None:
    tp = Throughput(baseline_tokens_per_s=500_000.0, behavior_tokens_per_s=600_000.0)
    p = daily_projection(50e6, 300.0, 18.0, depth=30, split=10, tp=tp)
    assert p["baseline_tokens"] == 1.5e10 and p["bahe_tokens"] == 9e8
    assert p["baseline_layer_tokens"] == 1.5e10 * 30 and p["bahe_layer_tokens"] == 9e8 * 10
    assert p["baseline_h100_hours"] == pytest.approx(1.5e10 / 5e5 / 3600)
    assert p["bahe_h100_hours"] == pytest.approx(9e8 / 6e5 / 3600)


def test_unencoded_users_get_the_mean_of_the_encoded() -> None:
    v = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], np.float32)
    out = fill_unencoded(v, np.array([True, True, False]))
    np.testing.assert_array_equal(out[2], [2.0, 3.0])
    np.testing.assert_array_equal(out[:2], v[:2])


def test_report_lists_every_method_and_phase() -> None:
    cell = {"mean": 0.7, "low": 0.69, "high": 0.71}
    metrics = {f"{m}_{p}": cell for m in ("auc", "gauc", "logloss") for p in ("all", "warm", "cold")}
    cost = Cost("behaviors_all", 10, 180, 10, 2.0, 500.0)
    results = {
        "quality": {"id_only": metrics, "bahe": metrics},
        "costs": {"behaviors_all": {**cost.__dict__, "layer_tokens": cost.layer_tokens}},
        "projection": daily_projection(50e6, 300.0, 18.0, 30, 10, Throughput()),
    }
    text = format_report(results)
    assert "| ID model only | 0.7000 [0.6900, 0.7100]" in text and "| BAHE user vector |" in text
    assert "| behaviors_all | 10 | 180 | 10 | 1,800 | 2 | 500 |" in text
    assert "50M records/day" in text
