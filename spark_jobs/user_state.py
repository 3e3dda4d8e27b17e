"""User state job: every user's events in time order through the state update, one row per (user, time).

    llmfeat user-state [--config local|PATH] [--set state.half_life_s=86400]
    spark-submit spark_jobs/user_state.py --config conf/local.yaml

Representation: the item vectors the MARC compressor version at marc.alias published (feast_item_marc_v<N>,
float32; an item re-encoded keeps its newest vector). Table `user_state_item_marc_v<N>`
(llmfeat/reprs.py `UserStateView`), one row per user and event time: the events of that time are applied
together (models/ctr/state.py `update`) and the row is stamped 1 microsecond after them, so Feast's
point-in-time join (values stamped at or before the row) gives every interaction the state of strictly
earlier events, and the newest row is what an online request reads. Columns: `USER_STATE_COLUMNS`, lineage
`STATE_LINEAGE` (representation, its version, the tapped layer).

The like rate is smoothed toward the train split's like rate (`state.prior_weight` pseudo-events). The scan
runs on the executors, one user at a time (groupBy + applyInPandas); the driver sees the base rate and
counts. A re-run rewrites the table to mirror the events (MERGE by user and time, rows of vanished events
deleted), after its great-expectations gate.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmfeat.config import Settings
from llmfeat.errors import UserError
from llmfeat.models.ctr.state import StateConfig, empty, to_row, update
from llmfeat.reprs import STATE_LINEAGE, USER_STATE_COLUMNS, MarcView, UserStateView

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

ONE_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class StateSummary:
    table: str
    rows: int
    users: int
    version: int
    base_rate: float

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.rows:,} states of {self.users:,} users "
            f"(like rate prior {self.base_rate:.4f}), version {self.version}"
        )


def scan_user(
    cfg: StateConfig, dim: int, lineage: tuple[str, str, int], events: pd.DataFrame
) -> pd.DataFrame:
    """applyInPandas body (bound with functools.partial, so Spark sees one argument): one user's events
    (user_id, event_timestamp, label, vector) -> one state row per event time; lineage: representation,
    its version, the tapped layer."""
    events = events.sort_values("event_timestamp", kind="stable")
    times = events["event_timestamp"].to_numpy()
    labels = events["label"].to_numpy()
    vectors = np.stack(events["vector"].to_numpy()) if len(events) else np.zeros((0, dim))
    state, rows = empty(dim), []
    starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
    for lo, hi in zip(starts, [*starts[1:], len(times)], strict=True):
        at = pd.Timestamp(times[lo])
        state = update(state, at.value // 1000, labels[lo:hi], vectors[lo:hi], cfg)
        row = to_row(state, cfg) | {"newest_event_at": at}
        rows.append((events["user_id"].iloc[0], at + ONE_US, *row.values(), *lineage))
    return pd.DataFrame(rows, columns=["user_id", "event_timestamp", *USER_STATE_COLUMNS, *STATE_LINEAGE])


def state_schema() -> str:
    vec = "array<float>"
    return (
        "user_id string, event_timestamp timestamp, event_count long, liked_count long, disliked_count long, "
        f"like_rate double, liked_mean {vec}, disliked_mean {vec}, liked_recent_mean {vec}, "
        f"disliked_recent_mean {vec}, liked_recent_weight double, disliked_recent_weight double, "
        "newest_event_at timestamp, representation string, representation_version string, layer long"
    )


def item_vectors(items: DataFrame, column: str) -> DataFrame:
    """(item_id, vector): each item's newest published vector."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    newest = Window.partitionBy("item_id").orderBy(F.col("event_timestamp").desc())
    ranked = items.select("item_id", F.col(column).alias("vector"), F.row_number().over(newest).alias("n"))
    return ranked.where("n = 1").drop("n")


def run(spark: SparkSession, settings: Settings) -> StateSummary:
    from pyspark.sql import functions as F

    from llmfeat.delta_io import open_tables
    from llmfeat.registry import resolve_alias
    from llmfeat.validation import gate, new_run_id
    from llmfeat.validation.suites import state_suite

    tables = open_tables(settings, spark)
    pinned = settings.state.item_version
    version = str(pinned) if pinned is not None else resolve_alias(settings, "items").version
    source = MarcView("item", version).feast_table
    if not tables.exists(source):
        raise UserError(f"{source} not found: run `llmfeat compress` and `llmfeat features` first")
    view = UserStateView("item_marc", version)
    published = tables.read_spark(source)
    layers = [r[0] for r in published.select("layer").distinct().limit(2).collect()]
    if len(layers) != 1:
        raise UserError(f"{source}: expected the vectors of one tapped layer, found {layers}")
    vectors = item_vectors(published, "item_vector")
    interactions = tables.read_spark("interactions")
    events = interactions.select("user_id", "item_id", "event_timestamp", "label")
    train = interactions.where("split = 'train'").agg(F.avg("label")).first()  # one number to the driver
    if train is None or train[0] is None:
        raise UserError("interactions has no train rows: the like rate's prior is the train split's rate")
    rate = float(train[0])
    joined = events.join(vectors, "item_id", "left")
    missing = joined.where(F.col("vector").isNull()).select("item_id").limit(3).collect()
    if missing:
        raise UserError(
            f"{source} has no vector for item_id {[r[0] for r in missing]}: re-run `llmfeat compress`"
        )
    example = vectors.select("vector").first()
    if example is None:
        raise UserError(f"{source} is empty: re-run `llmfeat compress` and `llmfeat features`")
    dim = len(example[0])
    cfg = StateConfig(rate, settings.state.prior_weight, settings.state.half_life_s)
    scan = functools.partial(scan_user, cfg, dim, ("item_marc", version, int(layers[0])))
    rows = (
        joined.select("user_id", "event_timestamp", "label", "vector")
        .groupBy("user_id")
        .applyInPandas(scan, state_schema())
    )
    rows = rows.persist()
    try:
        suite = state_suite(view.table, dim, settings.validation)
        gate(
            rows,
            suite,
            table=view.table,
            tables=tables,
            run_id=new_run_id("user-state"),
            conf=settings.validation,
        )
        committed = tables.upsert(view.table, rows, ["user_id", "event_timestamp"], delete_missing=True)
        users = rows.select("user_id").distinct().count()
        return StateSummary(view.table, rows.count(), users, committed, rate)
    finally:
        rows.unpersist()


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import job_main

    return job_main("user-state", argv, lambda spark, settings: print(run(spark, settings)))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.user_state import main as package_main

    sys.exit(package_main())
