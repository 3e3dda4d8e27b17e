"""The CTR training set on the executors: every interaction row with Feast's point-in-time join, written to
Delta, for lakes whose interactions do not fit one process.

    spark-submit spark_jobs/training_set_spark.py --config cluster [--no-llm]

The same set as spark_jobs/training_set.py (`build_frame`, Feast's own join in one process on a bounded
sample), built with Spark instead: for each row and each feature view of the service, the newest row of the
view's source at or before the row's own time (and within the view's TTL, where it has one), by an as-of
join per set of join keys (llmfeat/feast_join.py `spark_historical_features`). Every table is read at the
Delta version pinned in the snapshot, every interaction row is kept (no sample), and the set passes the same
leakage gate before it is written as the Delta table training_set_<service>. Only the newest interaction
time, the per-split counts and label rates and the share of rows with each vector reach the driver.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from llmfeat.delta_io import open_tables
from llmfeat.feast_join import spark_historical_features
from llmfeat.feast_repo import open_store
from llmfeat.job_args import llm_args
from llmfeat.spark_jobs.training_set import (
    SPLITS,
    Snapshot,
    TrainingSetSummary,
    check_training_set,
    delta_versions,
    join_plan,
    service_names,
    vector_lineage,
)

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.config import Settings
    from llmfeat.delta_io import DeltaTables

ROW_COLUMNS = ("user_id", "item_id", "event_timestamp", "label", "split")


def training_table(service: str) -> str:
    """The Delta table a service's training set is written to."""
    return f"training_set_{service}"


def build_spark_frame(
    tables: DeltaTables, store: FeatureStore, services: list[str]
) -> tuple[DataFrame, Snapshot]:
    """Every interaction row + the services' features, each as of the row's own time (a lazy Spark frame)."""
    from pyspark.sql import functions as F

    refs, features, marcs, states = join_plan(store, services)
    versions = delta_versions(tables, marcs, states)
    rows = tables.read_spark("interactions", versions["interactions"]).select(
        *(F.col(c).cast("string").alias(c) for c in ("user_id", "item_id")), *ROW_COLUMNS[2:]
    )
    newest = rows.agg(F.unix_micros(F.max("event_timestamp"))).collect()[0][0]  # one value
    as_of = datetime.fromtimestamp(newest / 1e6, UTC)
    frame = spark_historical_features(store, rows, refs, lambda t: tables.read_spark(t, versions.get(t)))
    lineage = vector_lineage(tables, marcs)
    return frame, Snapshot(as_of, versions, tuple(services), features, lineage, states)


def summarise_spark(frame: DataFrame, snapshot: Snapshot, gate: str, written: str) -> TrainingSetSummary:
    """`training_set.summarise` by Spark aggregates: one row per split and one of vector shares come back."""
    from pyspark.sql import functions as F

    per_split = frame.groupBy("split").agg(F.count("*").alias("rows"), F.avg("label").alias("rate")).collect()
    found = {r["split"]: r for r in per_split if r["split"] is not None}
    order = [s for s in SPLITS if s in found] + sorted(set(found) - set(SPLITS))
    vectors = [c for c in ("user_vector", "item_vector") if c in frame.columns]
    shares = frame.agg(
        F.count("*"), *(F.avg(F.col(c).isNotNull().cast("double")) for c in vectors)
    ).collect()[0]
    described: dict[str, Any] = {"rows": shares[0]}
    described |= {f"{c}_present": float(shares[i + 1] or 0.0) for i, c in enumerate(vectors)}
    return TrainingSetSummary(
        rows={s: found[s]["rows"] for s in order},
        label_rate={s: float(found[s]["rate"]) for s in order},
        described=described,
        snapshot=snapshot,
        gate=gate,
        written=written,
    )


def run(spark: SparkSession, settings: Settings, use_llm: bool = True) -> TrainingSetSummary:
    """Build the training set of ctr.llm_feature_service (or ctr.id_feature_service) on the executors, gate
    it and write it to Delta (training_set_<service>); returns its description, read from that table."""
    from pyspark import StorageLevel

    tables, store = open_tables(settings, spark), open_store(settings)
    services = service_names(settings, use_llm)
    frame, snapshot = build_spark_frame(tables, store, services)
    table = training_table(services[0])
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)  # the gate and the write read it once each
    try:
        checked = check_training_set(settings, tables, frame, snapshot, table)
        version = tables.write(table, frame)
    finally:
        frame.unpersist()
    written = f"Delta table {table}, version {version}"
    return summarise_spark(tables.read_spark(table, version), snapshot, checked.summary(), written)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="training-set-spark")
    config_args(parser)
    llm_args(parser)
    args = parser.parse_args(argv)
    return run_with_session(
        "training-set-spark",
        args.config,
        args.overrides,
        lambda spark, settings: print(run(spark, settings, args.llm).report()),
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.training_set_spark import main as package_main

    sys.exit(package_main())
