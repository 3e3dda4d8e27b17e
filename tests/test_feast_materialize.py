"""Publish, apply, materialize on a tiny lake; online fetch on SQLite; point-in-time training sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_feast_repo import DIM, feature_table, tiny_settings, vectors_for

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_join import historical_features, vector_matrix
from llmfeat.feast_repo import FeatureStoreError, apply_repo, open_store
from llmfeat.serving.features import OnlineFeatures
from llmfeat.spark_jobs import materialize

pytestmark = [pytest.mark.spark, pytest.mark.integration]

# Noon yesterday: every event sits mid-day, so a daily counter never lands before a row 1 hour later.
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
USERS, ITEMS = ["1", "2"], ["10", "11", "12"]
PAST, FUTURE = NOW - timedelta(days=20), NOW - timedelta(days=2)  # item 12's vector appears only at FUTURE


def tiny_lake(tables: RustDelta) -> None:
    tables.write(
        "items",
        pa.table(
            {
                "item_id": ITEMS,
                "title": ["A", "B", "C"],
                "year": [1995, None, 1997],
                "genres": ["X", "", "Y|Z"],
            }
        ),
    )
    days = [NOW - timedelta(days=d, hours=1) for d in (9, 8, 8, 5)]
    tables.write(
        "interactions",
        pa.table(
            {
                "user_id": ["1", "1", "2", "2"],
                "item_id": ["10", "11", "10", "12"],
                "label": pa.array([1, 0, 1, 1], pa.int32()),
                "event_timestamp": pa.array(days, pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    tables.write("user_marc_v1_features", feature_table("user_id", USERS, vectors_for(USERS, 1), PAST))
    item_ts = [PAST, PAST, FUTURE]
    items = feature_table("item_id", ITEMS, vectors_for(ITEMS, 2), item_ts, "int8")
    tables.write("item_marc_v1_features", items)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory: pytest.TempPathFactory) -> Settings:  # type: ignore[no-untyped-def]
    settings = tiny_settings(tmp_path_factory.mktemp("lake"))
    tiny_lake(RustDelta(settings.delta_root))
    materialize.run(spark, settings)
    return settings


def test_materialize_publishes_float32_vectors_with_lineage(lake: Settings) -> None:
    tables = RustDelta(lake.delta_root)
    items = tables.read_arrow("feast_item_marc_v1").sort_by("item_id")
    assert items.schema.field("item_vector").type == pa.list_(pa.float32())
    assert items["compressor_name"].to_pylist() == ["marc"] * 3 and items["dtype"].to_pylist() == ["int8"] * 3
    stats = tables.read_arrow("feast_user_stats").to_pandas().sort_values("event_timestamp")
    assert stats[stats.user_id == "1"]["user_impressions"].tolist() == [1, 2]  # cumulative, per active day
    online = (
        open_store(lake)
        .get_online_features(
            features=[
                "item_marc_v1_lineage_fv:compressor_version",
                "item_meta_fv:year",
                "item_stats_fv:item_impressions",
            ],
            entity_rows=[{"item_id": "10"}],
        )
        .to_dict()
    )
    assert (
        online["compressor_version"] == ["1"]
        and online["year"] == [1995]
        and online["item_impressions"] == [2]
    )


def test_ranking_request_on_sqlite_flags_unknown_ids(lake: Settings) -> None:
    batch = OnlineFeatures(open_store(lake)).fetch("1", ["10", "nope", "12"])
    assert batch.items.shape == (3, DIM) and batch.items.dtype == np.float32 and batch.user.shape == (DIM,)
    assert batch.item_missing.tolist() == [False, True, False] and not batch.user_missing
    np.testing.assert_allclose(batch.user, vectors_for(USERS, 1)[0])
    np.testing.assert_allclose(batch.items[0], vectors_for(ITEMS, 2)[0], atol=0.05)
    assert not batch.items[1].any()
    user, items, missing = batch.to_torch()
    assert tuple(items.shape) == (3, DIM) and bool(missing[1])
    assert OnlineFeatures(open_store(lake)).fetch("nobody", ["10"]).user_missing


def test_point_in_time_joins_no_future_vector_and_loses_no_row(lake: Settings) -> None:
    """Item 12's only vector is stamped FUTURE: an interaction before that must not see it, yet stays."""
    rows = pd.DataFrame(
        {
            "user_id": ["1", "2", "2", "1"],
            "item_id": ["10", "12", "12", "11"],
            "event_timestamp": [
                NOW - timedelta(days=9),
                FUTURE - timedelta(hours=1),
                NOW,
                PAST - timedelta(days=1),
            ],
            "label": [1, 0, 1, 0],
        }
    )
    out = historical_features(open_store(lake), rows, "ctr_marc_v2")
    assert len(out) == len(rows) and out["label"].tolist() == [1, 0, 1, 0]  # same rows, same order
    items, missing = vector_matrix(out, "item_vector", DIM)
    assert missing.tolist() == [
        False,
        True,
        False,
        True,
    ]  # 12 before FUTURE: not joined; 11 before PAST: none
    np.testing.assert_allclose(items[2], vectors_for(ITEMS, 2)[2], atol=0.05)
    assert (
        out["item_impressions"].iloc[0] != out["item_impressions"].iloc[0]
    )  # day 9: no earlier counter (NaN)


def test_incremental_materialize_publishes_new_vector_and_keeps_history(spark, lake: Settings) -> None:  # type: ignore[no-untyped-def]
    tables = RustDelta(lake.delta_root)
    fresh = datetime.now(UTC)
    new = vectors_for(["10"], 9)
    tables.upsert("item_marc_v1_features", feature_table("item_id", ["10"], new, fresh, "int8"), ["item_id"])
    materialize.run(spark, lake)
    np.testing.assert_allclose(
        OnlineFeatures(open_store(lake)).fetch("1", ["10"]).items[0], new[0], atol=0.05
    )
    before = pd.DataFrame(
        {"user_id": ["1"], "item_id": ["10"], "event_timestamp": [fresh - timedelta(hours=1)]}
    )
    old, _ = vector_matrix(historical_features(open_store(lake), before, "ctr_marc_v2"), "item_vector", DIM)
    np.testing.assert_allclose(old[0], vectors_for(ITEMS, 2)[0], atol=0.05)  # history: the vector of its time


def test_wrong_dimension_is_stopped_before_anything_is_written(spark, lake: Settings) -> None:  # type: ignore[no-untyped-def]
    tables = RustDelta(lake.delta_root)
    version = tables.version("feast_user_marc_v1")
    bad = feature_table("user_id", ["3"], vectors_for(["3"], dim=DIM + 1), datetime.now(UTC))
    tables.upsert("user_marc_v1_features", bad, ["user_id"])
    try:
        with pytest.raises(materialize.FeatureTableError, match="declares 64"):
            materialize.run(spark, lake)
        assert tables.version("feast_user_marc_v1") == version
    finally:
        tables.write("user_marc_v1_features", feature_table("user_id", USERS, vectors_for(USERS, 1), PAST))


def test_missing_online_table_says_to_materialize(tmp_path: Path, lake: Settings) -> None:
    fresh = tiny_settings(tmp_path)
    apply_repo(fresh)  # registered, never materialized
    with pytest.raises(FeatureStoreError, match="llmfeat features materialize"):
        OnlineFeatures(open_store(fresh))
    features = OnlineFeatures(open_store(lake))
    (Path(lake.data_dir) / "feast" / "online.db").unlink()
    with pytest.raises(FeatureStoreError, match="llmfeat features materialize"):
        features.fetch("1", ["10"])


def test_history_reads_each_table_as_its_current_version(tmp_path: Path) -> None:
    """A re-publish MERGEs the feast_* tables: the replaced Parquet files stay on disk for time travel, yet
    the point-in-time join sees only the current version (a changed year, and no row for a deleted item)."""
    from deltalake import DeltaTable

    settings = tiny_settings(tmp_path)
    tables = RustDelta(settings.delta_root)
    tiny_lake(tables)
    materialize.publish(None, tables)
    kept = tables.read_arrow("items").slice(0, 2)  # item 12 leaves the catalogue
    tables.upsert("items", kept.set_column(2, "year", pa.array([1999, 2001], pa.int64())), ["item_id"],
                  delete_missing=True)  # fmt: skip
    materialize.publish(None, tables)
    meta = settings.delta_root / "feast_item_meta"
    assert len(list(meta.glob("*.parquet"))) > len(DeltaTable(str(meta)).file_uris())  # replaced files remain
    rows = pd.DataFrame(
        {
            "user_id": ["1", "1", "2"],
            "item_id": ["10", "11", "12"],
            "event_timestamp": [NOW] * 3,
            "label": [1, 0, 1],
        }
    )
    out = historical_features(apply_repo(settings), rows, ["item_meta_fv:year"])
    assert out["year"].iloc[:2].tolist() == [1999, 2001] and pd.isna(out["year"].iloc[2])
