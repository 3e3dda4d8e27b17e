"""BAHE evaluation helpers: measured processes, the daily projection, the report (no Spark, no weights)."""

from __future__ import annotations

import numpy as np
import pytest

from llmfeat.spark_jobs.bahe_eval import (
    Cost,
    Throughput,
    UserDays,
    baseline_encoder_config,
    daily_projection,
    deep_train_cost,
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


TP = Throughput(baseline_tokens_per_s=500_000.0, behavior_tokens_per_s=600_000.0, deep_positions_per_s=2e6)
DAYS = UserDays(user_days=2500, records_per_user_day=40.0, user_tokens=300.0, new_behavior_tokens=50.0,
                deep_positions=100.0)  # fmt: skip


def test_daily_projection_counts_changed_user_days_at_measured_rates() -> None:
    p = daily_projection(50e6, DAYS, baseline_layer=15, split=10, deep=2, tp=TP)
    days = 50e6 / 40.0  # records -> changed user-days: the baseline re-encodes once per user-day, not record
    assert p["changed_user_days"] == days
    assert p["baseline_tokens"] == days * 300 and p["baseline_layer_tokens"] == days * 300 * 15
    assert p["bahe_behavior_tokens"] == days * 50 and p["bahe_deep_positions"] == days * 100
    assert p["bahe_layer_tokens"] == days * 50 * 10 + days * 100 * 2
    assert p["baseline_hours"] == pytest.approx(days * 300 / 5e5 / 3600)
    assert p["bahe_hours"] == pytest.approx((days * 50 / 6e5 + days * 100 / 2e6) / 3600)
    assert p["ratio"] == pytest.approx(p["baseline_hours"] / p["bahe_hours"])


def test_like_for_like_baseline_taps_the_compared_layer_and_stops_there() -> None:
    import torch
    from test_encoder import TEXTS, tiny_llama, tiny_tokenizer

    from llmfeat.config import load_settings
    from llmfeat.models.encoder import LayerEncoder, decoder_blocks

    assert load_settings("tiny").bahe.baseline.layer == 15  # the layer BAHE's competitor vector comes from
    cfg = baseline_encoder_config(2, max_length=64)
    assert cfg.layers == (2,)  # one tap: no deeper layer (such as 30) rides along in the same pass
    enc = LayerEncoder(tiny_llama(), tiny_tokenizer(), cfg, torch.device("cpu"))
    assert len(decoder_blocks(enc.model)) == 2  # blocks 3 and 4 of the tiny model are dropped
    assert enc.encode(TEXTS).vectors.shape == (len(TEXTS), 1, 32)


def test_training_cost_runs_the_same_blocks_over_tokens_or_behaviours(tmp_path) -> None:
    from test_encoder import make_tiny_model_dir

    folder = str(make_tiny_model_dir(tmp_path / "tiny"))
    bahe = deep_train_cost(folder, split=2, deep=1, lengths=[3, 5, 2], frozen=False, budget=8)
    tokens = deep_train_cost(folder, split=2, deep=1, lengths=[7, 9, 4], frozen=True, budget=8)
    assert bahe["positions"] == 10 and tokens["positions"] == 20
    assert bahe["trainable_parameters"] == tokens["trainable_parameters"] > 0
    assert bahe["seconds"] > 0 and tokens["seconds"] > 0


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
        "projection": daily_projection(50e6, DAYS, 15, 10, 2, TP),
    }
    text = format_report(results)
    assert "| ID model only | 0.7000 [0.6900, 0.7100]" in text and "| BAHE user vector |" in text
    assert "| behaviors_all | 10 | 180 | 10 | 1,800 | 2 | 500 |" in text
    assert "50M records/day = 1.25e+06 changed user-days" in text
