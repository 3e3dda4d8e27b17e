"""The pipeline with `delta.backend: delta-spark` on a standalone Spark master with two workers on 127.0.0.1:
one driver runs ingest, encode, compress and materialize, and every table is written through Spark's Delta
(MERGE on the cluster's executors). The test's own session then reads those tables, and Feast's Spark offline
store joins them into a point-in-time training set.

The tiny lake comes from the tiny CSVs (conftest) and a tiny random-weight Llama; the MARC compressors are
registered untrained with the lineage of that encoder, width and layer (its MLflow store is the lake's).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHORT_LIVED_JVM
from test_compress import LAYERS, repr_table
from test_encoder import make_tiny_model_dir
from test_gpu_cluster import run_driver_on_cluster

from llmfeat.config import Settings, load_settings
from llmfeat.delta_io import SparkDelta, has_delta_jars

pytestmark = [pytest.mark.spark, pytest.mark.integration]
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


def register_tiny_compressor(root: Path) -> tuple[Path, str]:
    """(tiny model folder, MLflow store holding untrained champion compressors for it), made under `root`:
    the lineage of the tiny Llama's representation tables (encoder, width, layer). This test checks where the
    tables are written; test_mlflow_project trains compressors."""
    import mlflow

    from llmfeat.models.marc.model import MarcCompressor
    from llmfeat.registry import log_and_register, use_tracking
    from llmfeat.reprs import layer_lineage

    model = make_tiny_model_dir(root / ENCODER)
    store = f"sqlite:///{root / 'mlflow.db'}"
    settings = load_settings("tiny", [f"data_dir={root}", *pipeline_overrides(model, store)])
    marc = settings.marc
    use_tracking(settings, marc.experiment)
    with mlflow.start_run():
        for entity, key in (("users", "snapshot_id"), ("items", "item_id")):
            table = repr_table(key, 2, ENCODER, WIDTH)
            lineage = layer_lineage(table, "tiny", marc.layer) | {
                "entity": entity,
                "in_dim": WIDTH,
                "out_dim": marc.out_dim,
            }
            compressor = MarcCompressor(in_dim=WIDTH, out_dim=marc.out_dim, hidden_dim=marc.hidden_dim)
            log_and_register(compressor, settings, entity, lineage)
    return model, store


def test_pipeline_on_a_standalone_cluster_writes_through_spark_delta_and_feast_reads_it(  # type: ignore[no-untyped-def]
    spark, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    assert has_delta_jars(spark), "the test session has no delta-spark jars: run `make setup`"
    trained = register_tiny_compressor(tmp_path / "compressor")
    settings = make_settings(*pipeline_overrides(*trained))
    overrides = [*pipeline_overrides(*trained), "spark.driver_memory=1g",
                 "spark.extra.spark.executor.memory=1g", "spark.extra.spark.executor.cores=1",
                 f"spark.extra.spark.executor.extraJavaOptions={SHORT_LIVED_JVM}",
                 f"data_dir={settings.data_dir}", *ingest_files(settings)]  # fmt: skip
    out = run_driver_on_cluster(
        tmp_path / "cluster", PIPELINE, lambda url: [*overrides, f"spark.master={url}"], REPO_ROOT
    )
    assert "executors: 2" in out, out  # one on each worker
    assert "items_repr: encoded 4 texts" in out, out
    assert "user_snapshots_repr: encoded" in out, out
    assert "items_repr: nothing to encode (4 texts unchanged)" in out, out  # a re-run
    published = [line.split()[1] for line in out.splitlines() if line.startswith("published ")]
    check_written_by_spark(spark, settings, published)
    check_point_in_time_set(spark, settings)


# One driver on the cluster runs the jobs in one session (what `llmfeat ingest`, `encode`, `compress` and
# `features materialize` run), re-runs the item encoding, then counts the executors that did the work.
PIPELINE = textwrap.dedent(
    """
    import sys
    from llmfeat.runner import run_with_session
    from llmfeat.spark_jobs import compress, encode, ingest, materialize

    def body(spark, settings):
        ingest.run(spark, settings)
        for entity in ("items", "user_snapshots", "items"):
            print(encode.run(spark, settings, entity), flush=True)
        compress.run(spark, settings)
        for p in materialize.run(spark, settings):
            if p.version >= 0:
                print(f"published {p.table} version {p.version}", flush=True)
        infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()
        print("executors:", len(infos) - 1, flush=True)  # without the driver

    overrides = sys.argv[1:]
    sys.exit(run_with_session("pipeline", "tiny", overrides, body))
    """
)


def ingest_files(settings: Settings) -> list[str]:
    files = settings.ingest.files
    assert files is not None
    return ["ingest.source=files", f"ingest.files.interactions={files.interactions}",
            f"ingest.files.items={files.items}", f"ingest.files.users={files.users}"]  # fmt: skip


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
