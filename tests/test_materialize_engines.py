"""Materialization that scales, per profile: the embedded file store streams each entity's newest row in
bounded batches (llmfeat/feast_delta.py), and the cluster's Feast Spark engine (spark.engine, the Spark
offline store) materializes on the executors; both leave the SQLite online store as Feast's own whole-window
read does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from feast import FeatureStore, FileSource
from feast.data_format import DeltaFormat
from test_ctr_lake import counters
from test_feast_materialize import ITEMS, NOW, USERS, tiny_lake
from test_feast_repo import feature_table, tiny_settings, vectors_for

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_delta import newest_in_window, newest_per_key
from llmfeat.feast_repo import open_store, repo_objects, store_config, use_data_dir
from llmfeat.paths import feature_repo_dir
from llmfeat.sample import scan
from llmfeat.spark_jobs import materialize

T0 = datetime(2024, 1, 1, tzinfo=UTC)
# What the Spark engine test materializes (each view is a Spark job of a few seconds): a vector with history,
# its lineage (timestamps among the values), static metadata stamped at the epoch, a daily counter per user.
ENGINE_VIEWS = ("item_marc_v1_fv", "item_marc_v1_lineage_fv", "item_meta_fv", "user_stats_fv")


def history(n: int = 40) -> pd.DataFrame:
    """n rows over 7 users and 2 regions; each (user, region) has several times, some sharing one time."""
    return pd.DataFrame(
        {
            "user_id": [str(i % 7) for i in range(n)],
            "region": [("n", "s")[i % 2] for i in range(n)],
            "event_timestamp": [T0 + timedelta(hours=(i * 5) % 11) for i in range(n)],
            "created": [T0 + timedelta(minutes=i) for i in range(n)],
            "value": list(range(n)),
        }
    )


def newest_by_pandas(frame: pd.DataFrame, keys: list[str], order: list[str]) -> pd.DataFrame:
    newest = frame.sort_values(order, ascending=False).drop_duplicates(keys)
    return newest.sort_values(keys).reset_index(drop=True)


@pytest.mark.unit
@pytest.mark.parametrize("keys", [["user_id"], ["user_id", "region"]])
def test_newest_per_key_over_small_batches_is_the_whole_table_answer(keys: list[str]) -> None:
    frame = history()
    batches = pa.Table.from_pandas(frame, preserve_index=False).to_batches(max_chunksize=3)
    order = ["event_timestamp", "created"]  # ties on the event time go to the later created row
    out = newest_per_key(batches, keys, order)
    assert out is not None
    got = out.to_pandas().sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, newest_by_pandas(frame, keys, order))
    assert newest_per_key([], keys, order) is None


@pytest.mark.unit
def test_a_delta_window_is_read_in_batches_of_batch_rows(tmp_path: Path) -> None:
    frame = history()
    write_deltalake(str(tmp_path / "t"), pa.Table.from_pandas(frame, preserve_index=False))
    for extra in range(2):  # more files, so that the scan crosses file boundaries
        write_deltalake(
            str(tmp_path / "t"),
            pa.Table.from_pandas(frame.head(5 + extra), preserve_index=False),
            mode="append",
        )
    sizes = [b.num_rows for b in scan(DeltaTable(str(tmp_path / "t")), ["user_id"], batch_rows=4)]
    assert max(sizes) <= 4 and sum(sizes) == 40 + 5 + 6
    source = FileSource(
        path=str(tmp_path / "t"), file_format=DeltaFormat(), timestamp_field="event_timestamp"
    )
    start, end = T0 + timedelta(hours=2), T0 + timedelta(hours=8)
    out = newest_in_window(source, tmp_path, ["user_id"], ["value"], ["event_timestamp", "created"],
                           start, end, batch_rows=4)  # fmt: skip
    whole = DeltaTable(str(tmp_path / "t")).to_pandas()
    window = whole[whole["event_timestamp"].between(start, end)]
    expected = newest_by_pandas(window, ["user_id"], ["event_timestamp", "created"])
    got = out.to_pandas().sort_values("user_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected[["user_id", "value", "event_timestamp", "created"]])


def store_for(settings: Settings, folder: Path, offline: dict[str, Any], pull_latest: bool) -> FeatureStore:
    """The repository under `settings` with its registry and online store in `folder`, applied."""
    from feast.repo_config import RepoConfig

    doc = store_config(settings.model_copy(update={"feast": settings.feast.model_copy(
        update={"repo_dir": str(folder)})}))  # fmt: skip
    doc["offline_store"] = {**doc["offline_store"], **offline}
    doc["materialization"] = {"pull_latest_features": pull_latest}
    folder.mkdir(parents=True, exist_ok=True)
    use_data_dir(settings)  # the declarations' sources read this lake
    config = RepoConfig(**doc)
    config.repo_path = feature_repo_dir()
    store = FeatureStore(repo_path=str(feature_repo_dir()), config=config)
    store.apply(repo_objects(settings))
    return store


def online_values(store: FeatureStore, views: list[str]) -> dict[str, dict[str, list[Any]]]:
    """Every feature of these views, online, for every tiny-lake key (None where the store has none)."""
    out = {}
    for name in views:
        view = store.get_feature_view(name)
        key = view.entity_columns[0].name
        ids = USERS if key == "user_id" else ITEMS
        refs = [f"{name}:{f.name}" for f in view.features]
        out[name] = store.get_online_features(refs, [{key: k} for k in ids]).to_dict()
    return out


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tiny lake published (vectors, item metadata; the daily counters as the Spark job computes them);
    item 10 has a newer vector than its first, so its history holds two rows."""
    settings = tiny_settings(tmp_path_factory.mktemp("engines"))
    tables = RustDelta(settings.delta_root)
    tiny_lake(tables)
    materialize.publish(None, tables)
    newer = feature_table("item_id", ["10"], vectors_for(["10"], 9), NOW - timedelta(days=1), "int8")
    tables.upsert("item_marc_v1_features", newer, ["item_id"])
    materialize.publish(None, tables)
    assert tables.read_arrow("feast_item_marc_v1").num_rows == len(ITEMS) + 1
    for key, prefix in (("user_id", "user"), ("item_id", "item")):
        tables.write(f"feast_{prefix}_stats", counters(tables.read_arrow("interactions"), key, prefix))
    return settings


@pytest.fixture(scope="module")
def embedded(lake: Settings) -> tuple[list[str], dict[str, Any]]:
    """The embedded profile's materialization, read in batches of two rows: (views, online values)."""
    views = materialize.views_on([p.name for p in lake.delta_root.iterdir() if p.name.startswith("feast_")])
    store = store_for(lake, Path(lake.data_dir) / "embedded", {"batch_rows": 2}, pull_latest=True)
    assert store.config.offline_store.batch_rows == 2
    materialize.materialize(store, views)
    return views, online_values(store, views)


@pytest.mark.integration
def test_embedded_materialization_in_small_batches_matches_the_whole_window_read(
    lake: Settings, embedded: tuple[list[str], dict[str, Any]]
) -> None:
    views, streamed = embedded
    whole = store_for(lake, Path(lake.data_dir) / "whole", {}, pull_latest=False)  # Feast's own read
    materialize.materialize(whole, views)
    assert streamed == online_values(whole, views)
    assert {"item_marc_v1_fv", "item_meta_fv", "user_stats_fv", "item_stats_fv"} <= set(views)
    item_vector = streamed["item_marc_v1_fv"]["item_vector"]
    assert item_vector[0] == pytest.approx(vectors_for(["10"], 9)[0], abs=0.05)  # the newer of item 10's two
    assert all(v is not None for v in streamed["item_meta_fv"]["title"])


@pytest.mark.spark
@pytest.mark.integration
def test_spark_engine_materializes_what_the_embedded_path_writes(  # type: ignore[no-untyped-def]
    spark, lake: Settings, embedded: tuple[list[str], dict[str, Any]]
) -> None:
    """feast.batch_engine spark: Feast's SparkComputeEngine reads the SparkSource twins (the feast_* Delta
    tables registered in the session's catalog, as on a cluster's metastore) and each executor task writes
    its rows to the online store (SQLite here, Redis on a cluster)."""
    from feast.infra.compute_engines.spark.compute import SparkComputeEngine

    expected = {v: embedded[1][v] for v in ENGINE_VIEWS}
    cluster = tiny_settings(Path(lake.data_dir), "feast.offline_store=spark", "feast.batch_engine=spark",
                            f"feast.repo_dir={Path(lake.data_dir) / 'spark-engine'}")  # fmt: skip
    names = [p.name for p in lake.delta_root.iterdir() if p.name.startswith("feast_")]
    for name in names:
        spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{lake.delta_root / name}'")
    try:
        store = open_store(cluster)
        store.apply(repo_objects(cluster))
        assert isinstance(store._get_provider().batch_engine, SparkComputeEngine)  # type: ignore[attr-defined]
        materialize.materialize(store, list(ENGINE_VIEWS))
        got = online_values(store, list(ENGINE_VIEWS))
    finally:
        for name in names:
            spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.conf.unset("spark.sql.parser.quotedRegexColumnNames")  # Feast sets it on the shared session
    assert got == expected
