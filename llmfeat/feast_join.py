"""Feast's point-in-time join, guarded: every entity row kept, each joined to the latest value at or before
its own event_timestamp (never a later one). The CTR training set built on it: spark_jobs/training_set.py.
The same join on the executors (`spark_historical_features`), for sets larger than one process, is below.

Feast's file offline store silently drops entity rows that have no feature value in the TTL window (here: an
interaction older than the first vector of its user or item). The guard joins one view at a time on
the distinct (join keys, event_timestamp) pairs and merges each result back onto every row, so such rows come
back with that view's features null and the others filled, in their original order (the store also collapses
rows that share keys and time: two interactions of one user in one second).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.errors import UserError
from llmfeat.sample import Sample, SampleConf

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


class TrainingSetError(UserError, ValueError):
    pass


def historical_features(store: FeatureStore, entity_df: pd.DataFrame, features: Any) -> pd.DataFrame:
    """entity_df (join keys, event_timestamp in UTC, labels...) -> the same rows plus the features.

    `features`: a FeatureService, its name, or a list of "view:feature" references. Feast's file store keeps
    one row per (join keys, event_timestamp), so two interactions of one user in the same second would come
    back as one: each view is joined on its distinct (keys, time) pairs and merged back onto every row.
    """
    if "event_timestamp" not in entity_df.columns:
        raise TrainingSetError(f"entity_df needs an event_timestamp column; found {list(entity_df.columns)}")
    rows = entity_df.reset_index(drop=True).copy()
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    out = rows
    for refs in refs_by_view(store, features):
        keys = [*_join_keys(store, refs[0].split(":", 1)[0]), "event_timestamp"]
        missing = [k for k in keys if k not in rows.columns]
        if missing:
            raise TrainingSetError(f"entity_df lacks {missing}, the join keys of {refs[0]}")
        pairs = rows[keys].drop_duplicates().reset_index(drop=True)
        joined = store.get_historical_features(entity_df=pairs, features=refs).to_df()
        joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True)
        if joined.duplicated(keys).any():
            raise TrainingSetError(f"the point-in-time join of {refs[0]} returned one (keys, time) twice")
        added = [c for c in joined.columns if c not in rows.columns]
        out = out.merge(joined[[*keys, *added]], on=keys, how="left", validate="many_to_one")
        if len(joined) < len(pairs):
            log.info(
                "%s: %d of %d (keys, time) pairs had no value at their time (kept, null)",
                refs[0],
                len(pairs) - len(joined),
                len(pairs),
            )
    if len(out) != len(rows):
        raise TrainingSetError(f"the point-in-time join returned {len(out)} rows for {len(rows)}")
    return out


def _join_keys(store: FeatureStore, view: str) -> list[str]:
    fv = store.get_feature_view(view)
    return [store.get_entity(e).join_key for e in fv.entities]


def refs_by_view(store: FeatureStore, features: Any) -> list[list[str]]:
    """A FeatureService (or its name) or "view:feature" references -> references grouped by view."""
    if isinstance(features, str):
        features = store.get_feature_service(features)
    if not isinstance(features, list):
        features = [
            f"{p.name_to_use()}:{f.name}" for p in features.feature_view_projections for f in p.features
        ]
    groups: dict[str, list[str]] = {}
    for ref in features:
        groups.setdefault(ref.split(":", 1)[0], []).append(ref)
    return list(groups.values())


def vector_matrix(frame: pd.DataFrame, column: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of vectors (or nulls) -> ([B, D] float32 with zero rows where missing, [B] bool missing)."""
    missing = frame[column].isna().to_numpy()
    out = np.zeros((len(frame), dim), dtype=np.float32)  # [B, D]
    present = frame.loc[~missing, column]
    if len(present):
        out[~missing] = np.stack(present.to_numpy()).astype(np.float32)
    return out, missing


def interactions_entity_df(
    tables: Any, split: str | None = None, sample: SampleConf | None = None
) -> pd.DataFrame:
    """The interactions Delta table as an entity frame: user_id, item_id, event_timestamp, label, split (the
    rows of the sampled users: every user up to `sample.max_users`, see llmfeat/sample.py)."""
    columns = ["user_id", "item_id", "event_timestamp", "label", "split"]
    df = Sample(tables, sample or SampleConf()).read("interactions", columns).to_pandas()
    if split is not None:
        df = df[df["split"] == split]
    return df[["user_id", "item_id", "event_timestamp", "label", "split"]].reset_index(drop=True)


# The Spark as-of join: Feast's point-in-time semantics on the executors, for training sets larger than one
# process. Each entity row of `rows` gets, per view, the newest row of the view's source with the same join
# keys stamped at or before the row's own event_timestamp (and, for a view with a TTL, not before the row's
# time minus it); none leaves its features null. The views sharing one set of join keys are joined in one
# pass: their rows and the entity rows are unioned, sorted by time within each key (a feature row before an
# entity row of the same time, later created timestamps after earlier ones) and every entity row takes, per
# view, the last feature row before it (`last(..., ignorenulls)` over a running window): one shuffle per set
# of keys, whatever a key's history (no range join), and nothing collected.
AS_OF_TIME, AS_OF_SIDE, AS_OF_CREATED = "__as_of_time", "__as_of_side", "__as_of_created"


@dataclass(frozen=True)
class ViewRows:
    """One feature view as the Spark as-of join reads it: its source rows and what to take from them."""

    name: str
    frame: Any  # a Spark DataFrame of the view's source
    keys: tuple[str, ...]
    features: tuple[str, ...]  # feature names; `mapping` names their source columns where they differ
    timestamp: str = "event_timestamp"
    created: str | None = None
    ttl: timedelta | None = None  # None or zero: a value never expires
    mapping: dict[str, str] = field(default_factory=dict)  # feature -> source column


def as_of_join(rows: Any, views: list[ViewRows]) -> Any:
    """`rows` (a Spark DataFrame with the views' join keys and event_timestamp) with every feature of `views`,
    all sharing one set of join keys, as of each row's own time (see above)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys = list(views[0].keys)
    if any(list(v.keys) != keys for v in views):
        raise TrainingSetError(f"one as-of pass joins views of one set of keys: {[v.keys for v in views]}")
    if missing := [c for c in [*keys, "event_timestamp"] if c not in rows.columns]:
        raise TrainingSetError(f"the rows lack {missing}, the join keys of {views[0].name}")
    added = [f for v in views for f in v.features]
    if clash := sorted({f for f in added if f in rows.columns or added.count(f) > 1}):
        raise TrainingSetError(f"features {clash} would be joined twice: name each once in the references")
    parts = [rows.withColumn(AS_OF_TIME, F.col("event_timestamp")).withColumn(AS_OF_SIDE, F.lit(1))]
    for i, view in enumerate(views):
        stamped = view.frame.where(F.col(view.timestamp).isNotNull())
        for k in keys:
            stamped = stamped.where(F.col(k).isNotNull())
        columns = [F.col(view.mapping.get(f, f)).alias(f) for f in view.features]
        parts.append(stamped.select(
            *keys,
            F.col(view.timestamp).alias(AS_OF_TIME),
            F.lit(0).alias(AS_OF_SIDE),
            (F.col(view.created) if view.created else F.lit(None).cast("timestamp")).alias(AS_OF_CREATED),
            F.struct(F.col(view.timestamp).alias(AS_OF_TIME), *columns).alias(f"__as_of_{i}"),
        ))  # fmt: skip
    both = parts[0]
    for part in parts[1:]:
        both = both.unionByName(part, allowMissingColumns=True)
    before = (
        Window.partitionBy(*keys)
        .orderBy(AS_OF_TIME, AS_OF_SIDE, AS_OF_CREATED)
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    newest = [
        F.last(f"__as_of_{i}", ignorenulls=True).over(before).alias(f"__as_of_{i}") for i in range(len(views))
    ]
    picked = both.select(*rows.columns, AS_OF_TIME, AS_OF_SIDE, *newest).where(F.col(AS_OF_SIDE) == 1)
    out = [F.col(c) for c in rows.columns]
    for i, view in enumerate(views):
        value = F.col(f"__as_of_{i}")
        if view.ttl:  # Feast: a value older than the row's time minus the TTL is no value
            oldest = F.col(AS_OF_TIME) - F.expr(f"INTERVAL {int(view.ttl.total_seconds())} SECONDS")
            value = F.when(value[AS_OF_TIME] >= oldest, value)
        out += [value[f].alias(f) for f in view.features]
    return picked.select(*out)


def source_table(source: Any) -> str:
    """The Delta table a view's source reads: a SparkSource's table, or the last folder of a FileSource's
    path (data_sources.py: <data dir>/delta/<table>)."""
    return str(getattr(source, "table", None) or str(source.path).rstrip("/").rsplit("/", 1)[-1])


def spark_historical_features(
    store: FeatureStore, rows: Any, features: Any, read: Callable[[str], Any]
) -> Any:
    """`historical_features` on the executors: `rows` (a Spark DataFrame of join keys, event_timestamp and
    labels) with the features of a FeatureService, its name, or "view:feature" references, each as of the
    row's own time. `read(table)` gives a source's Delta table as a Spark DataFrame (a pinned version)."""
    by_keys: dict[tuple[str, ...], list[ViewRows]] = {}
    for refs in refs_by_view(store, features):
        name = refs[0].split(":", 1)[0]
        view = store.get_feature_view(name)
        source = view.batch_source
        if source is None:
            raise TrainingSetError(f"feature view {name} has no batch source to join")
        keys = tuple(_join_keys(store, name))
        mapping = {feature: column for column, feature in (source.field_mapping or {}).items()}
        by_keys.setdefault(keys, []).append(
            ViewRows(
                name,
                read(source_table(source)),
                keys,
                tuple(r.split(":", 1)[1] for r in refs),
                source.timestamp_field or "event_timestamp",
                source.created_timestamp_column or None,
                view.ttl,
                mapping,
            )  # fmt: skip
        )
    out = rows
    for views in by_keys.values():
        out = as_of_join(out, views)
    return out
