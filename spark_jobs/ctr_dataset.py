"""CTR training set: interactions (a pinned Delta version) joined with Feast features at one snapshot time.

Why one snapshot time: the vectors are stamped when they were encoded (today), while the logged interactions
are older (ML-100k: 1997-98), so a join at each interaction's own time would find no vector at all. The
features are therefore joined *as of the snapshot* `as_of` (the newest vector stamp), per entity through
Feast's get_historical_features (llmfeat.training_set.historical_features), and attached to every row;
training and serving then see the same values (the online store holds the latest).

Leakage rule (METHODS.md): a user vector encodes that user's behaviour before `encode.history_cut` (labels
included). It is withheld (null, flagged missing) on every row before the cut, so no row sees its own label.
The training-set gate (`check_training_set`) checks this on every build: per view, the latest time its values
can hold interaction information (the cut for user vectors, the snapshot for counters, none for item content)
is never after the row's event; a planted violation stops training and quarantines the rows.

Splits used by the trainer: fit = train + the earliest (1 - ctr.stop_frac) of valid; valid = the latest
ctr.stop_frac of valid (early stopping and the reported valid metrics); test = the test split.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from llmfeat.errors import UserError
from llmfeat.training_set import _refs_by_view, historical_features

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import Settings
    from llmfeat.delta_io import DeltaTables
    from llmfeat.validation.gating import GateReport

VECTOR_TABLES = ("feast_user_llm", "feast_item_llm")
LINEAGE_COLUMNS = ("encoder_id", "layer", "compressor_name", "compressor_version", "source_version")
VERSIONED_TABLES = (
    "interactions",
    "items",
    *VECTOR_TABLES,
    "feast_item_meta",
    "user_features",
    "item_features",
)


# Until when a view's values can hold information from interactions, which the training-set gate checks is
# never after a row's event: a user vector encodes behaviour before the history cut; item content (text
# vectors, metadata) holds none; any other view (counters) is joined as of the snapshot.
HISTORY_VIEWS = frozenset({"user_llm_fv"})
CONTENT_VIEWS = frozenset({"item_llm_fv", "item_meta_fv"})


class SnapshotChanged(UserError, RuntimeError):
    """A table moved to a new Delta version while the training set was being built."""


@dataclass(frozen=True)
class Snapshot:
    """What a training set or a comparison was built from: enough to rebuild it."""

    as_of: dt.datetime
    history_cut: dt.datetime
    delta_versions: dict[str, int]
    services: tuple[str, ...]
    features: dict[str, tuple[str, ...]]  # feature view -> its columns in the frame
    lineage: dict[str, str] = field(default_factory=dict)

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.features)

    def tags(self) -> dict[str, str]:
        out = {
            "feast.feature_services": ",".join(self.services),
            "feast.feature_views": ",".join(self.views),
            "snapshot.as_of": self.as_of.isoformat(),
            "snapshot.history_cut": self.history_cut.isoformat(),
        }
        out |= {f"delta.{t}.version": str(v) for t, v in self.delta_versions.items()}
        return out | {f"lineage.{k}": v for k, v in self.lineage.items()}


def delta_versions(tables: DeltaTables) -> dict[str, int]:
    return {t: int(v) for t in VERSIONED_TABLES if tables.exists(t) and (v := tables.version(t)) is not None}


def history_cut(interactions: pd.DataFrame, cut: str) -> dt.datetime:
    """encode.history_cut: a split name (its first timestamp) or an ISO time (spark_jobs/user_text.py)."""
    if cut in set(interactions["split"]):
        first = interactions.loc[interactions["split"] == cut, "event_timestamp"].min()
        return pd.Timestamp(first).to_pydatetime()
    ts = pd.Timestamp(cut)
    return (ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC")).to_pydatetime()


def snapshot_time(tables: DeltaTables, interactions: pd.DataFrame) -> dt.datetime:
    """The newest vector stamp (or the last interaction when no vector is published)."""
    stamps = [pd.Timestamp(interactions["event_timestamp"].max())]
    for t in VECTOR_TABLES:
        if tables.exists(t):
            stamps.append(pd.Timestamp(pc.max(tables.read_arrow(t)["event_timestamp"]).as_py()))
    return max(stamps).to_pydatetime()


def vector_lineage(tables: DeltaTables) -> dict[str, str]:
    """Distinct lineage values of the published vectors, e.g. {"user.layer": "15", ...}."""
    out: dict[str, str] = {}
    for t, who in zip(VECTOR_TABLES, ("user", "item"), strict=True):
        if not tables.exists(t):
            continue
        data = tables.read_arrow(t)
        for col in LINEAGE_COLUMNS:
            if col in data.column_names:
                values = sorted({str(v) for v in data[col].to_pylist()})
                out[f"{who}.{col}"] = ",".join(values)
    return out


def _refs_by_entity(
    store: FeatureStore, services: list[str]
) -> tuple[dict[str, list[str]], dict[str, tuple[str, ...]]]:
    """Feature references of the services grouped by join key ({"user_id": [...], "item_id": [...]}), and
    each view's feature names."""
    refs: dict[str, list[str]] = {}
    views: dict[str, set[str]] = {}
    for name in services:
        for group in _refs_by_view(store, name):
            view = store.get_feature_view(group[0].split(":", 1)[0])
            (entity,) = view.entities
            key = store.get_entity(entity).join_key
            views.setdefault(view.name, set()).update(r.split(":", 1)[1] for r in group)
            refs.setdefault(key, [])
            refs[key] += [r for r in group if r not in refs[key]]
    return refs, {v: tuple(sorted(f)) for v, f in sorted(views.items())}


def features_as_of(
    store: FeatureStore, keys: dict[str, list[str]], services: list[str], as_of: dt.datetime
) -> tuple[dict[str, pd.DataFrame], dict[str, tuple[str, ...]]]:
    """Per join key: a frame key + features, each value the latest at or before `as_of` (Feast PIT join)."""
    refs, views = _refs_by_entity(store, services)
    out = {}
    for key, ids in keys.items():
        entity_df = pd.DataFrame({key: sorted(set(ids)), "event_timestamp": as_of})
        frame = historical_features(store, entity_df, refs[key]) if key in refs else entity_df
        out[key] = frame.drop(columns="event_timestamp")
    return out, views


def build_frame(
    settings: Settings,
    tables: DeltaTables,
    store: FeatureStore,
    services: list[str],
    split: str | None = None,
) -> tuple[pd.DataFrame, Snapshot]:
    """Interactions (optionally one split) + the services' features as of the snapshot."""
    versions = delta_versions(tables)
    rows = tables.read_arrow("interactions", version=versions["interactions"]).to_pandas()
    cut = history_cut(rows, settings.encode.history_cut)
    as_of = snapshot_time(tables, rows)
    if split is not None:
        rows = rows[rows["split"] == split]
    rows = rows[["user_id", "item_id", "event_timestamp", "label", "split"]].reset_index(drop=True)
    rows[["user_id", "item_id"]] = rows[["user_id", "item_id"]].astype(str)
    keys = {"user_id": rows["user_id"].tolist(), "item_id": rows["item_id"].tolist()}
    joined, views = features_as_of(store, keys, services, as_of)
    if delta_versions(tables) != versions:
        raise SnapshotChanged(f"Delta tables changed while the training set was built: {versions}")
    frame = rows.merge(joined["user_id"], on="user_id", how="left").merge(
        joined["item_id"], on="item_id", how="left"
    )
    if "user_vector" in frame.columns:
        before = pd.to_datetime(frame["event_timestamp"], utc=True) < pd.Timestamp(cut)
        frame["user_vector"] = frame["user_vector"].where(~before.to_numpy(), None)
    snapshot = Snapshot(as_of, cut, versions, tuple(services), views, vector_lineage(tables))
    return frame, snapshot


def information_times(frame: pd.DataFrame, snapshot: Snapshot) -> tuple[pd.DataFrame, list[str]]:
    """What the training-set gate reads: keys, label, event time and, per view that can hold interaction
    information, the latest time it may (see HISTORY_VIEWS; null on rows without that view's features)."""
    out = frame[["user_id", "item_id", "event_timestamp", "label"]].copy()
    out["event_timestamp"] = pd.to_datetime(out["event_timestamp"], utc=True)
    columns = []
    for view, features in snapshot.features.items():
        if view in CONTENT_VIEWS:
            continue
        known = snapshot.history_cut if view in HISTORY_VIEWS else snapshot.as_of
        present = frame[list(features)].notna().any(axis=1)
        column = f"{view}_information_time"
        out[column] = pd.Series(pd.to_datetime(known, utc=True), index=out.index).where(present)
        columns.append(column)
    return out, columns


def check_training_set(
    settings: Settings, tables: DeltaTables, frame: pd.DataFrame, snapshot: Snapshot, name: str
) -> GateReport:
    """The training set's great-expectations gate: label rate, sane times, no feature from the future.
    Raises GateFailed (rows quarantined, nothing trained) or returns the report to link from the run."""
    from llmfeat.validation import gate, new_run_id, training_set_suite

    data, times = information_times(frame, snapshot)
    suite = training_set_suite(times, name=name, conf=settings.validation)
    run_id = new_run_id("train-ctr")
    return gate(data, suite, table=name, tables=tables, run_id=run_id, conf=settings.validation)


def split_masks(frame: pd.DataFrame, stop_frac: float) -> dict[str, np.ndarray]:
    """fit / valid / test row masks (see the module docstring); valid is the latest stop_frac of valid."""
    valid = (frame["split"] == "valid").to_numpy()
    ts = pd.to_datetime(frame["event_timestamp"], utc=True).astype("int64").to_numpy()
    cut = np.quantile(ts[valid], 1 - stop_frac) if valid.any() else np.inf
    late = valid & (ts >= cut)
    return {
        "fit": (frame["split"] == "train").to_numpy() | (valid & ~late),
        "valid": late,
        "test": (frame["split"] == "test").to_numpy(),
        "train": (frame["split"] == "train").to_numpy(),
    }


def service_names(settings: Settings, use_llm: bool) -> list[str]:
    return [settings.ctr.llm_feature_service if use_llm else settings.ctr.id_feature_service]


def describe(frame: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(frame)}
    for col in ("user_vector", "item_vector"):
        if col in frame.columns:
            out[f"{col}_present"] = float(frame[col].notna().mean())
    return out
