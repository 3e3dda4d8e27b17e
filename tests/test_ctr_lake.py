"""A tiny lake for the CTR, comparison and serving tests: the tables the ingest and compress jobs write (same
schemas), published and materialized into a Feast repo in tmp_path (no Spark needed), plus a fresh SQLite
MLflow store. Labels follow the dot product of hidden user and item factors, which the LLM vectors carry and
the ids alone cannot (users are new in the later splits), so the model with LLM features should win.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_feast_repo import feature_table

from llmfeat.config import Settings, load_settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import open_store
from llmfeat.spark_jobs import materialize

N_USERS, N_ITEMS, PER_USER = 60, 40, 12
START = datetime(2001, 1, 1, tzinfo=UTC)
GENRES = ["Action", "Comedy", "Drama"]


def lake_settings(tmp: Path, *overrides: str) -> Settings:
    return load_settings(
        "tiny",
        [
            f"data_dir={tmp}",
            "ctr.max_epochs=3",
            "ctr.residual_lr=0.005",  # a few hundred rows: the branch needs a larger step to show
            "ctr.n_boot=20",
            "ctr.hidden=[16]",
            "ctr.batch_size=128",
            "abtest.requests=40",
            "abtest.n_boot=50",
            "serving.flush_every=10",
            *overrides,
        ],
    )


def interactions(rng: np.random.Generator, u_lat: np.ndarray, i_lat: np.ndarray) -> pa.Table:
    """Users arrive over time (each user's rows on consecutive days), splits by a global 70/15/15 time cut."""
    rows = []
    for u in range(N_USERS):
        for k, i in enumerate(rng.choice(N_ITEMS, PER_USER, replace=False)):
            ts = START + timedelta(days=u, hours=k)
            label = int(u_lat[u] @ i_lat[i] + 0.3 * rng.normal() > 0)
            rows.append((str(u + 1), str(i + 1), 1.0 + 4 * label, label, ts))
    rows.sort(key=lambda r: r[4])
    n = len(rows)
    split = ["train" if j < 0.7 * n else "valid" if j < 0.85 * n else "test" for j in range(n)]
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "user_id": pa.array(cols[0], pa.string()),
            "item_id": pa.array(cols[1], pa.string()),
            "rating": pa.array(cols[2], pa.float64()),
            "label": pa.array(cols[3], pa.int32()),
            "event_timestamp": pa.array(cols[4], pa.timestamp("us", tz="UTC")),
            "split": pa.array(split, pa.string()),
        }
    )


def items_table(rng: np.random.Generator) -> pa.Table:
    years = [int(y) if y % 7 else None for y in rng.integers(1980, 2001, N_ITEMS)]
    genres = ["|".join(sorted(set(rng.choice(GENRES, 2).tolist()))) for _ in range(N_ITEMS)]
    return pa.table(
        {
            "item_id": [str(i + 1) for i in range(N_ITEMS)],
            "title": [f"Item {i + 1}" for i in range(N_ITEMS)],
            "year": pa.array(years, pa.int64()),
            "genres": genres,
        }
    )


def build_lake(tmp: Path, *overrides: str) -> Settings:
    """Write the tables, publish and materialize them; returns settings pointing at tmp."""
    settings = lake_settings(tmp, *overrides)
    rng = np.random.default_rng(7)
    u_lat, i_lat = rng.normal(size=(N_USERS, 4)), rng.normal(size=(N_ITEMS, 4))
    proj = rng.normal(size=(4, 64))
    tables = RustDelta(settings.delta_root)
    tables.write("items", items_table(rng))
    tables.write("interactions", interactions(rng, u_lat, i_lat))
    users, items = [str(u + 1) for u in range(N_USERS)], [str(i + 1) for i in range(N_ITEMS)]
    # One snapshot per user, valid from the user's first interaction (demographics-only in the real job);
    # item vectors valid from before the first interaction.
    first = [START + timedelta(days=u) for u in range(N_USERS)]
    snaps = feature_table("user_id", users, u_lat @ proj / 4, first)
    snaps = snaps.append_column("history_until", pa.nulls(N_USERS, pa.timestamp("us", tz="UTC")))
    tables.write("user_marc_v1_features", snaps)
    tables.write("item_marc_v1_features", feature_table("item_id", items, i_lat @ proj / 4, START, "int8"))
    for key, prefix in (("user_id", "user"), ("item_id", "item")):
        tables.write(f"feast_{prefix}_stats", counters(tables.read_arrow("interactions"), key, prefix))
    materialize.run(None, settings)
    materialize.materialize(open_store(settings), ["user_stats_fv", "item_stats_fv"])
    return settings


def counters(inter: pa.Table, key: str, prefix: str) -> pa.Table:
    """The materialize job's daily cumulative counters (it needs Spark for them; the tiny lake does not)."""
    df = inter.to_pandas()
    df["day"] = df["event_timestamp"].dt.floor("D")
    daily = df.groupby([key, "day"]).agg(n=("label", "size"), c=("label", "sum")).reset_index()
    daily[[f"{prefix}_impressions", f"{prefix}_clicks"]] = daily.groupby(key)[["n", "c"]].cumsum()
    daily["event_timestamp"] = daily["day"] + timedelta(days=1)
    out = daily[[key, "event_timestamp", f"{prefix}_impressions", f"{prefix}_clicks"]]
    return pa.Table.from_pandas(out, preserve_index=False).cast(
        pa.schema(
            [
                (key, pa.string()),
                ("event_timestamp", pa.timestamp("us", tz="UTC")),
                (f"{prefix}_impressions", pa.int64()),
                (f"{prefix}_clicks", pa.int64()),
            ]
        )
    )


@pytest.mark.integration
def test_tiny_lake_has_vectors_online(tmp_path: Path) -> None:
    from llmfeat.serving.features import OnlineFeatures

    settings = build_lake(tmp_path)
    batch = OnlineFeatures(open_store(settings)).fetch("1", ["1", "2", "nope"])
    assert not batch.user_missing and batch.item_missing.tolist() == [False, False, True]


def train_both(settings: Settings) -> None:
    """ID-only model -> champion, model with LLM features -> challenger."""
    from llmfeat.cli.ctr_commands import train_models

    train_models(settings, llm=True, both=True, alias=None)


def fresh_copy(lake: Settings, tmp: Path, *overrides: str) -> Settings:
    """Settings on a new data dir that shares the lake's Delta tables and Feast repo (read-only) and gets its
    own copy of the lake's MLflow store (a fresh SQLite file per test)."""
    import shutil

    data = tmp / "data"
    data.mkdir()
    for name in ("delta", "feast"):
        (data / name).symlink_to(Path(lake.data_dir) / name)
    src = Path(lake.data_dir) / "mlflow" / "mlflow.db"
    if src.exists():
        (data / "mlflow").mkdir()
        shutil.copy(src, data / "mlflow" / "mlflow.db")
    return lake_settings(data, *overrides)


@pytest.fixture(autouse=True)
def no_open_run():  # type: ignore[no-untyped-def]
    yield
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        mlflow.end_run()
        pytest.fail(f"test left MLflow run {active.info.run_id} open")


@pytest.mark.integration
def test_refresh_serves_online_what_the_point_in_time_join_gives_a_row_stamped_now(tmp_path: Path) -> None:
    """A newer snapshot of user 1 published and materialized incrementally: the online store serves it,
    the same vector the offline join gives a row stamped now, while a row before it still gets the old one."""
    from llmfeat.feast_join import historical_features, vector_matrix

    settings = build_lake(tmp_path)
    tables = RustDelta(settings.delta_root)
    old = tables.read_arrow("user_marc_v1_features").to_pandas()
    newer_at = datetime.now(UTC)  # the new day's snapshot, after the last materialization
    row = old[old["user_id"] == "1"].copy()
    row["event_timestamp"] = newer_at
    row["vector"] = [np.asarray(v)[::-1].copy() for v in row["vector"]]
    schema = tables.read_arrow("user_marc_v1_features").schema
    newer = pa.Table.from_pandas(row, preserve_index=False).cast(schema)
    tables.upsert("user_marc_v1_features", newer, ["user_id", "event_timestamp"])
    materialize.run(None, settings)
    store = open_store(settings)
    online = store.get_online_features(["user_marc_v1_fv:user_vector"], [{"user_id": "1"}]).to_dict()
    now = pd.DataFrame({"user_id": ["1", "1"], "item_id": ["1", "1"],
                        "event_timestamp": [datetime.now(UTC), newer_at - timedelta(seconds=1)]})  # fmt: skip
    offline = historical_features(store, now, ["user_marc_v1_fv:user_vector"])
    dim = len(online["user_vector"][0])
    at_now, _ = vector_matrix(offline.iloc[:1], "user_vector", dim)
    before, _ = vector_matrix(offline.iloc[1:], "user_vector", dim)
    np.testing.assert_array_equal(np.asarray(online["user_vector"][0], np.float32), at_now[0])
    assert not np.array_equal(at_now[0], before[0])
