"""The pipeline with `delta.backend: delta-spark`: ingest, encode, compress and materialize write through
Spark's Delta (MERGE on the executors), and Feast's Spark offline store reads those tables for a point-in-time
training set, on the test session (local Spark). tests/test_standalone_cluster.py runs them on a standalone
master with two local workers.

The tiny lake comes from the tiny CSVs (conftest) and a tiny random-weight Llama; the MARC compressor is
trained once on synthetic representation tables of the same encoder, width and layer (its MLflow store is the
lake's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from test_compress import LAYERS, repr_table
from test_encoder import make_tiny_model_dir

from llmfeat.config import Settings, load_settings
from llmfeat.delta_io import SparkDelta, has_delta_jars

pytestmark = pytest.mark.spark
REPO_ROOT = Path(__file__).resolve().parents[1]
WIDTH, ENCODER = 32, "tiny-llama"  # the tiny Llama's hidden size and encoder id (its folder's name)


def pipeline_overrides(model: Path, store: str) -> list[str]:
    return [
        "delta.backend=delta-spark",
        f"encode.model={model}",
        f"encode.layers=[{','.join(map(str, LAYERS))}]",
        "encode.max_length=64",
        "encode.partitions=2",
        f"marc.layer={LAYERS[-1]}",
        "marc.out_dim=64",  # the width feature_repo declares for MARC vectors
        "marc.hidden_dim=8",
        "marc.task_dim=4",
        "marc.max_epochs=2",
        "marc.batch_size=64",
        "marc.registry_name=test-marc",
        f"mlflow.tracking_uri={store}",
    ]


def synthetic_inputs(delta: Path) -> None:
    """Representation tables of the tiny Llama's shape (encoder, width, layers), enough rows to fit MARC."""
    rng = np.random.default_rng(1)
    n, n_users, n_items = 600, 12, 10
    ts = (946_684_800 + np.sort(rng.integers(0, 10**6, n))) * 1_000_000
    q8, q9 = np.quantile(ts, [0.8, 0.9])
    tables = {
        "users": pa.table({"user_id": [str(k) for k in range(n_users)]}),
        "items": pa.table({"item_id": [str(k) for k in range(n_items)]}),
        "interactions": pa.table(
            {
                "user_id": [str(k) for k in rng.integers(0, n_users, n)],
                "item_id": [str(k) for k in rng.integers(0, n_items, n)],
                "label": pa.array(rng.integers(0, 2, n), pa.int32()),
                "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "split": np.where(ts < q8, "train", np.where(ts < q9, "valid", "test")).tolist(),
            }
        ),
        "user_snapshots_repr": repr_table("snapshot_id", n_users, ENCODER, WIDTH).set_column(
            0, "snapshot_id", pa.array([f"{k}@2000-01-01T00:00:00" for k in range(n_users) for _ in LAYERS])
        ),
        "items_repr": repr_table("item_id", n_items, ENCODER, WIDTH, seed=1),
    }
    for name, table in tables.items():
        write_deltalake(str(delta / name), table, mode="overwrite")


def train_tiny_compressor(spark, root: Path) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """(tiny model folder, MLflow store holding the champion compressors for it), made under `root`."""
    import torch

    from llmfeat.spark_jobs.train_compressor import run as train_compressor

    assert has_delta_jars(spark), "the test session has no delta-spark jars: run `make setup`"
    torch.set_num_threads(1)
    model = make_tiny_model_dir(root / ENCODER)
    store = f"sqlite:///{root / 'mlflow.db'}"
    synthetic_inputs(root / "synthetic" / "delta")
    settings = load_settings("tiny", [f"data_dir={root / 'synthetic'}", *pipeline_overrides(model, store)])
    train_compressor(spark, settings)  # reads the delta-rs tables through Spark's Delta reader
    return model, store


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    return train_tiny_compressor(spark, tmp_path_factory.mktemp("delta-spark"))


def test_pipeline_writes_through_spark_delta_and_feast_reads_it(  # type: ignore[no-untyped-def]
    spark, trained: tuple[Path, str], make_settings: Callable[..., Settings]
) -> None:
    from llmfeat.spark_jobs import compress, encode, ingest, materialize

    settings = make_settings(*pipeline_overrides(*trained))
    ingest.run(spark, settings)
    for entity in ("items", "user_snapshots"):
        assert encode.run(spark, settings, entity).encoded > 0
    assert encode.run(spark, settings, "items").encoded == 0  # a re-run: nothing new, no commit
    compress.run(spark, settings)
    published = materialize.run(spark, settings)
    check_written_by_spark(spark, settings, [p.table for p in published if p.version >= 0])
    check_point_in_time_set(spark, settings)


def check_written_by_spark(spark, settings: Settings, feast_tables: list[str]) -> None:  # type: ignore[no-untyped-def]
    tables = SparkDelta(settings.delta_root, spark)
    for name in ("items", "interactions", "items_repr", "user_snapshots_repr", *feast_tables):
        engine = tables.history(name)[-1]["engineInfo"] or ""
        assert "Delta-Lake" in engine, (name, engine)  # committed by delta-spark, not delta-rs
    assert tables.read_spark("items_repr").count() == 4 * len(LAYERS)
    assert {"feast_item_meta", "feast_user_stats"} <= set(feast_tables)
    assert any(t.startswith("feast_item_marc") for t in feast_tables), feast_tables


def check_point_in_time_set(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Feast's Spark offline store (SparkSource twins, tables registered in the session's catalog) joins each
    interaction to the values at or before its own time."""
    from llmfeat.feast_join import historical_features
    from llmfeat.feast_repo import apply_repo, feature_views

    spark_settings = settings.model_copy(
        update={"feast": settings.feast.model_copy(update={"offline_store": "spark"})}
    )
    names = [p.name for p in Path(settings.delta_root).iterdir() if p.name.startswith("feast_")]
    for name in names:
        spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{settings.delta_root / name}'")
    try:
        store = apply_repo(spark_settings)
        item_marc = sorted(v for v in feature_views() if v.startswith("item_marc_v") and "lineage" not in v)[
            0
        ]
        rows = SparkDelta(settings.delta_root, spark).read_spark("interactions").toPandas()
        rows = rows[["user_id", "item_id", "event_timestamp", "label"]].sort_values("event_timestamp")
        features = ["item_meta_fv:year", "item_stats_fv:item_impressions", f"{item_marc}:item_vector"]
        out = historical_features(store, rows, features)
    finally:
        for name in names:
            spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.conf.unset("spark.sql.parser.quotedRegexColumnNames")  # Feast sets it on the shared session
    assert len(out) == len(rows) == 10 and out["label"].tolist() == rows["label"].tolist()
    assert out["year"].dropna().astype(int).isin([1995]).all()
    first = out.groupby("item_id")["event_timestamp"].transform("min") == out["event_timestamp"]
    # item counters are stamped at the end of each day: none is visible at an item's first interaction
    assert pd.isna(out.loc[first, "item_impressions"]).all()
    assert out["item_vector"].notna().any()
