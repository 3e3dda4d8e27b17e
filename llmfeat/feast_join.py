"""Feast's point-in-time join, guarded: every entity row kept, each joined to the latest value at or before
its own event_timestamp (never a later one). The CTR training set built on it: spark_jobs/training_set.py.

Feast's file offline store silently drops entity rows that have no feature value in the TTL window (here: an
interaction older than the first vector of its user or item). The guard joins one view at a time on
the distinct (join keys, event_timestamp) pairs and merges each result back onto every row, so such rows come
back with that view's features null and the others filled, in their original order (the store also collapses
rows that share keys and time: two interactions of one user in one second).
"""

from __future__ import annotations

import logging
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
