"""Top-K candidates: published to Delta, declared in Feast, materialized and read online per user."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_lite import N_USERS, tiny_lake

from llmfeat.config import load_settings

pytestmark = pytest.mark.integration


def test_candidates_reach_the_online_store(tmp_path: Path) -> None:
    from llmfeat.feast_repo import apply_repo, feature_views
    from llmfeat.spark_jobs.train_lite import build_model, load_lite_data, publish_candidates

    tiny_lake(tmp_path / "lake")
    settings = load_settings(
        "tiny", [f"data_dir={tmp_path / 'lake'}", "lite.layer=2", "lite.max_seq=6", "lite.dim=8",
                 "lite.publish_k=5"],
    )  # fmt: skip
    data = load_lite_data(settings)
    model = build_model("lite", settings.lite, data.log.n_items, data.item_vectors)
    report, checked = publish_candidates(settings, data, model, "run-1")
    assert f"{N_USERS:,} users" in report and checked.success and checked.table == "user_candidates"
    assert "user_candidates_fv" in feature_views()

    store = apply_repo(settings)
    now = datetime.now(UTC)
    store.materialize(now - timedelta(days=1), now + timedelta(minutes=1), ["user_candidates_fv"])
    got = store.get_online_features(
        features=["user_candidates_fv:candidate_items", "user_candidates_fv:run_id"],
        entity_rows=[{"user_id": "3"}, {"user_id": "nobody"}],
    ).to_dict()
    assert len(got["candidate_items"][0]) == 5 and got["run_id"][0] == "run-1"
    assert got["candidate_items"][1] is None
