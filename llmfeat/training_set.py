"""Point-in-time training sets from Feast: every entity row kept, each joined to the latest value at or before
its own event_timestamp (never a later one).

Feast's file offline store silently drops entity rows that have no feature value in the TTL window (here: an
interaction older than the first vector of its user or item). The guard numbers the rows before the join and
joins each view's result back onto them, one view at a time, so such rows come back with that view's
features null and the others filled, in their original order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.errors import UserError

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)
ROW = "_llmfeat_row"


class TrainingSetError(UserError, ValueError):
    pass


def historical_features(store: FeatureStore, entity_df: pd.DataFrame, features: Any) -> pd.DataFrame:
    """entity_df (join keys, event_timestamp in UTC, labels...) -> the same rows plus the features.

    `features`: a FeatureService, its name, or a list of "view:feature" references.
    """
    if "event_timestamp" not in entity_df.columns:
        raise TrainingSetError(f"entity_df needs an event_timestamp column; found {list(entity_df.columns)}")
    rows = entity_df.reset_index(drop=True).copy()
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    rows[ROW] = np.arange(len(rows), dtype=np.int64)
    out = rows
    for refs in _refs_by_view(store, features):
        # One join per view: the file store drops a row lacking any one view's value, so a shared join would
        # also lose the values of the other views for that row.
        joined = store.get_historical_features(entity_df=rows, features=refs).to_df()
        if joined[ROW].duplicated().any():
            raise TrainingSetError(
                "the point-in-time join duplicated entity rows: duplicate keys in entity_df?"
            )
        added = [c for c in joined.columns if c not in rows.columns]
        out = out.merge(joined[[ROW, *added]], on=ROW, how="left", validate="one_to_one")
        if len(joined) < len(rows):
            log.info(
                "%s: %d of %d rows had no value at their time (kept, null)",
                refs[0],
                len(rows) - len(joined),
                len(rows),
            )
    return out.sort_values(ROW).drop(columns=ROW).reset_index(drop=True)


def _refs_by_view(store: FeatureStore, features: Any) -> list[list[str]]:
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


def interactions_entity_df(tables: Any, split: str | None = None) -> pd.DataFrame:
    """The interactions Delta table as an entity frame: user_id, item_id, event_timestamp, label[, split]."""
    df = tables.read_arrow("interactions").to_pandas()
    if split is not None:
        df = df[df["split"] == split]
    return df[["user_id", "item_id", "event_timestamp", "label", "split"]].reset_index(drop=True)
