"""The user state job on the tiny lake: one row per user and event time, stamped just after it, equal to the
pure update replayed over the same events (the function the online path calls), and idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_ctr_lake import build_lake

from llmfeat.delta_io import RustDelta
from llmfeat.models.ctr.state import StateConfig, empty, update
from llmfeat.reprs import UserStateView
from llmfeat.spark_jobs import user_state

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_lake(tmp_path_factory.mktemp("state"), "state.item_version=1", "state.half_life_s=86400")


def test_state_rows_equal_the_pure_update_replayed(spark, lake) -> None:  # type: ignore[no-untyped-def]
    summary = user_state.run(spark, lake)
    tables = RustDelta(lake.delta_root)
    table = UserStateView("item_marc", "1").table
    assert summary.table == table and summary.users == 60
    states = tables.read_arrow(table).to_pandas().sort_values(["user_id", "event_timestamp"])
    events = tables.read_arrow("interactions").to_pandas()
    assert len(states) == len(events.groupby(["user_id", "event_timestamp"]))  # one row per user and time
    items = tables.read_arrow("feast_item_marc_v1").to_pandas().set_index("item_id")["item_vector"]
    rate = events.loc[events["split"] == "train", "label"].mean()
    assert summary.base_rate == pytest.approx(rate)
    cfg = StateConfig(rate, lake.state.prior_weight, lake.state.half_life_s)
    for user in ("1", "30"):
        mine = events[events["user_id"] == user].sort_values("event_timestamp")
        got = states[states["user_id"] == user]
        state = empty(64)
        for (at, group), (_, row) in zip(mine.groupby("event_timestamp"), got.iterrows(), strict=True):
            vectors = np.stack(group["item_id"].map(items).to_numpy())
            state = update(state, at.value // 1000, group["label"].to_numpy(), vectors, cfg)
            assert row["event_timestamp"] == at + pd.Timedelta(microseconds=1)  # strictly after its events
            assert row["newest_event_us"] == at.value // 1000 and row["event_count"] == state.event_count
            assert row["like_rate"] == pytest.approx(state.like_rate(cfg))
            for column, want in zip(
                ("liked_mean", "disliked_mean", "liked_recent_mean", "disliked_recent_mean"),
                (*state.means(), *state.recent_means()),
                strict=True,
            ):
                np.testing.assert_allclose(np.asarray(row[column]), want, rtol=1e-5, atol=1e-6)
    assert set(states["representation_version"]) == {"1"} and set(states["layer"]) == {
        states["layer"].iloc[0]
    }
    items = tables.read_arrow("item_state").to_pandas()
    assert summary.item_rows == len(items) == len(events.groupby(["item_id", "event_timestamp"]))
    newest = items.sort_values("event_timestamp").groupby("item_id").last()
    counts = events.groupby("item_id")["label"].agg(["count", "sum"])
    assert (newest["item_event_count"] == counts["count"]).all()
    assert (newest["item_liked_count"] == counts["sum"]).all()


def test_a_rerun_mirrors_the_events_without_duplicates(spark, lake) -> None:  # type: ignore[no-untyped-def]
    first = user_state.run(spark, lake)
    again = user_state.run(spark, lake)
    assert again.rows == first.rows
    assert RustDelta(lake.delta_root).read_arrow(first.table).num_rows == first.rows


def test_missing_item_vectors_are_named(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from llmfeat.errors import UserError

    settings = build_lake(tmp_path / "lake", "state.item_version=7")
    with pytest.raises(UserError, match="feast_item_marc_v7 not found"):
        user_state.run(spark, settings)
