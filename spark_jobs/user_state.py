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

Events: the interactions table plus the events pushed online (`pushed_events`: POST /events, `llmfeat
push`), each event id once, and a pushed event that is already an interaction (same user, item and time)
once. An item without a vector counts as a zero vector in the means, as it does online.

Items get the same scan without vectors: `item_state`, one row per item and event time with its fresh
impressions and clicks (`ITEM_STATE_COLUMNS`), stamped the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from llmfeat.config import Settings
from llmfeat.errors import UserError
from llmfeat.models.ctr.state import StateConfig, empty, item_row, to_row, update
from llmfeat.reprs import (
    EVENTS_TABLE,
    ITEM_STATE_COLUMNS,
    ITEM_STATE_TABLE,
    STATE_LINEAGE,
    STATE_PRIOR_TABLE,
    USER_STATE_COLUMNS,
    MarcView,
    UserStateView,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables

ONE_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class StateSummary:
    table: str
    rows: int
    users: int
    version: int
    base_rate: float
    item_rows: int = 0
    item_version: int = -1
    pushed: int = 0  # events from pushed_events that are not interactions
    without_vector: int = 0  # events whose item has no vector (a zero vector in the means)

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.rows:,} states of {self.users:,} users "
            f"(like rate prior {self.base_rate:.4f}), version {self.version}; "
            f"{ITEM_STATE_TABLE}: {self.item_rows:,} rows, version {self.item_version}; "
            f"{self.pushed:,} pushed events, {self.without_vector:,} events on items without a vector"
        )


def scan_user(
    cfg: StateConfig, dim: int, lineage: tuple[str, str, int], events: pd.DataFrame
) -> pd.DataFrame:
    """applyInPandas body (bound by `bound_scan`, so Spark sees one argument): one user's events
    (user_id, event_timestamp, label, vector) -> one state row per event time; lineage: representation,
    its version, the tapped layer."""
    events = events.sort_values("event_timestamp", kind="stable")
    times = events["event_timestamp"].to_numpy()
    labels = events["label"].to_numpy()
    zero = np.zeros(dim)
    vectors = (
        np.stack([zero if v is None else v for v in events["vector"]]) if len(events) else zero[None, :0]
    )
    state, rows = empty(dim), []
    for lo, hi, at in _times(times):
        state = update(state, at.value // 1000, labels[lo:hi], vectors[lo:hi], cfg)
        rows.append((events["user_id"].iloc[0], at + ONE_US, *to_row(state, cfg).values(), *lineage))
    return pd.DataFrame(rows, columns=["user_id", "event_timestamp", *USER_STATE_COLUMNS, *STATE_LINEAGE])


def bound_scan(
    cfg: StateConfig, dim: int, lineage: tuple[str, str, int]
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """scan_user with its settings bound, as a plain function (Spark reads the type hints of what it gets)."""

    def scan(events: pd.DataFrame) -> pd.DataFrame:
        return scan_user(cfg, dim, lineage, events)

    return scan


def scan_item(events: pd.DataFrame) -> pd.DataFrame:
    """applyInPandas body: one item's events (item_id, event_timestamp, label) -> a counters row per time."""
    events = events.sort_values("event_timestamp", kind="stable")
    labels = events["label"].to_numpy()
    state, rows, none = empty(0), [], np.zeros((0, 0))
    for lo, hi, at in _times(events["event_timestamp"].to_numpy()):
        state = update(state, at.value // 1000, labels[lo:hi], none.reshape(hi - lo, 0), StateConfig())
        rows.append((events["item_id"].iloc[0], at + ONE_US, *item_row(state).values()))
    return pd.DataFrame(rows, columns=["item_id", "event_timestamp", *ITEM_STATE_COLUMNS])


def _times(times: np.ndarray) -> list[tuple[int, int, pd.Timestamp]]:
    """(start, end, time) of each run of equal times in sorted times: the events applied together."""
    starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]]) if len(times) else np.zeros(0, int)
    ends = [*starts[1:], len(times)]
    return [(int(lo), int(hi), pd.Timestamp(times[lo])) for lo, hi in zip(starts, ends, strict=True)]


def state_schema() -> str:
    vec = "array<float>"
    return (
        "user_id string, event_timestamp timestamp, event_count long, liked_count long, disliked_count long, "
        f"like_rate double, liked_mean {vec}, disliked_mean {vec}, liked_recent_mean {vec}, "
        f"disliked_recent_mean {vec}, liked_recent_weight double, disliked_recent_weight double, "
        "newest_event_us long, representation string, representation_version string, layer long"
    )


ITEM_STATE_SCHEMA = (
    "item_id string, event_timestamp timestamp, item_event_count long, item_liked_count long, "
    "item_newest_event_us long"
)


def all_events(tables: DeltaTables) -> tuple[DataFrame, int]:
    """(user_id, item_id, event_timestamp, label) of every interaction and every pushed event that is not one
    (each event id once), and how many pushed ones were added (one count to the driver)."""
    keys = ["user_id", "item_id", "event_timestamp"]
    events = tables.read_spark("interactions").select(*keys, "label")
    if not tables.exists(EVENTS_TABLE):
        return events, 0
    pushed = tables.read_spark(EVENTS_TABLE).dropDuplicates(["event_id"]).select(*keys, "label")
    new = pushed.join(events.select(*keys), keys, "left_anti")
    return events.unionByName(new), new.count()


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
    from llmfeat.validation.suites import item_state_suite, state_suite

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
    train = interactions.where("split = 'train'").agg(F.avg("label")).first()  # one number to the driver
    if train is None or train[0] is None:
        raise UserError("interactions has no train rows: the like rate's prior is the train split's rate")
    rate = float(train[0])
    events, pushed = all_events(tables)
    joined = events.join(vectors, "item_id", "left")
    without_vector = joined.where(F.col("vector").isNull()).count()
    example = vectors.select("vector").first()
    if example is None:
        raise UserError(f"{source} is empty: re-run `llmfeat compress` and `llmfeat features`")
    dim = len(example[0])
    cfg = StateConfig(rate, settings.state.prior_weight, settings.state.half_life_s)
    scan = bound_scan(cfg, dim, ("item_marc", version, int(layers[0])))
    rows = (
        joined.select("user_id", "event_timestamp", "label", "vector")
        .groupBy("user_id")
        .applyInPandas(scan, state_schema())
        .persist()
    )
    items = (
        events.select("item_id", "event_timestamp", "label")
        .groupBy("item_id")
        .applyInPandas(scan_item, ITEM_STATE_SCHEMA)
        .persist()
    )
    try:
        run_id = new_run_id("user-state")
        gate(rows, state_suite(view.table, dim, settings.validation), table=view.table, tables=tables,
             run_id=run_id, conf=settings.validation)  # fmt: skip
        gate(items, item_state_suite(settings.validation), table=ITEM_STATE_TABLE, tables=tables,
             run_id=run_id, conf=settings.validation)  # fmt: skip
        committed = tables.upsert(view.table, rows, ["user_id", "event_timestamp"], delete_missing=True)
        item_version = tables.upsert(
            ITEM_STATE_TABLE, items, ["item_id", "event_timestamp"], delete_missing=True
        )
        prior = pa.table({"table": [view.table], "base_rate": [rate], "prior_weight": [cfg.prior_weight],
                          "half_life_s": [cfg.half_life_s]})  # fmt: skip
        tables.upsert(STATE_PRIOR_TABLE, prior, ["table"])
        users = rows.select("user_id").distinct().count()
        return StateSummary(
            view.table, rows.count(), users, committed, rate, items.count(), item_version, pushed,
            without_vector,
        )  # fmt: skip
    finally:
        rows.unpersist()
        items.unpersist()


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import job_main

    return job_main("user-state", argv, lambda spark, settings: print(run(spark, settings)))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.user_state import main as package_main

    sys.exit(package_main())
