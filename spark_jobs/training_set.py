"""The CTR training set job: every interaction row (a pinned Delta version) with Feast's point-in-time join.

    spark-submit spark_jobs/training_set.py --config local [--no-llm]   # build, gate and describe the set

Needs no Spark (Delta is read with delta-rs, features come from Feast): `run` takes `spark=None`.

Each row gets, per feature view, the newest value stamped at or before its own event_timestamp
(`get_historical_features`, one view at a time so that Feast's file store cannot drop a row): the user's
newest snapshot, whose text holds only behaviours strictly before the snapshot time; the item vector, valid
from the item's first availability; counters up to the previous day. The set holds exactly the interaction
rows (asserted). No snapshot join, no nulling at a cut.

Leakage gate (`check_training_set`): besides the features, the join fetches when each vector became valid and,
for user snapshots, the newest behaviour its text holds, and for each fresh state view (Feast tag kind=state)
the newest event the joined state holds (newest_event_us, item_newest_event_us: epoch microseconds); the gate
stops a row whose vector is stamped after it, whose text holds the row's own event (or a later one), or whose
state holds an event at or after the row's own time.

Splits used by the trainer: fit = train + the earliest (1 - ctr.stop_frac) of valid; valid = the latest
ctr.stop_frac of valid (early stopping and the reported valid metrics); test = the test split.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.delta_io import open_tables
from llmfeat.errors import UserError
from llmfeat.feast_join import TrainingSetError, historical_features, refs_by_view
from llmfeat.feast_repo import open_store
from llmfeat.job_args import llm_args
from llmfeat.reprs import FEATURE_LINEAGE, NEWEST_EVENT_FIELDS, MarcView, marc_views_in, state_table
from llmfeat.sample import Sample, distinct_values

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession

    from llmfeat.config import CtrConf, Settings
    from llmfeat.delta_io import DeltaTables
    from llmfeat.validation.gating import GateReport

# Pinned for every training set; the MARC tables of the compressor version its services name, and the state
# tables of its state views, are added.
VERSIONED_TABLES = ("interactions", "items", "feast_item_meta", "feast_user_stats", "feast_item_stats")


# The lineage fields the gate reads, per side of a MARC view: when the vector became valid, and for user
# snapshots the newest behaviour its text holds (which must precede the row strictly).
TIME_FIELDS = {"user": ("user_valid_from", "user_history_until"), "item": ("item_valid_from",)}


class SnapshotChanged(UserError, RuntimeError):
    """A table moved to a new Delta version while the training set was being built."""


@dataclass(frozen=True)
class Snapshot:
    """What a training set or a comparison was built from: enough to rebuild it."""

    as_of: dt.datetime  # the newest interaction of the set
    delta_versions: dict[str, int]
    services: tuple[str, ...]
    features: dict[str, tuple[str, ...]]  # feature view -> its columns in the frame
    lineage: dict[str, str] = field(default_factory=dict)
    # state view (Feast tag kind=state) -> the frame's column holding the newest event its state holds
    newest_events: dict[str, str] = field(default_factory=dict)

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.features)

    def tags(self) -> dict[str, str]:
        out = {
            "feast.feature_services": ",".join(self.services),
            "feast.feature_views": ",".join(self.views),
            "snapshot.as_of": self.as_of.isoformat(),
            "training_set.join": "point-in-time per row",
        }
        out |= {f"delta.{t}.version": str(v) for t, v in self.delta_versions.items()}
        return out | {f"lineage.{k}": v for k, v in self.lineage.items()}


def delta_versions(tables: DeltaTables, marcs: list[MarcView], states: Iterable[str] = ()) -> dict[str, int]:
    """The current version of every table the set reads: the fixed ones, the MARC tables of `marcs` and the
    state tables of the state views `states`."""
    names = [*VERSIONED_TABLES, *(t for m in marcs for t in (m.feast_table, m.features_table))]
    names += [t for v in states if (t := state_table(v)) is not None]
    return {t: int(v) for t in names if tables.exists(t) and (v := tables.version(t)) is not None}


def vector_lineage(tables: DeltaTables, marcs: list[MarcView]) -> dict[str, str]:
    """Distinct lineage values of the published vectors, e.g. {"user.layer": "15", ...}."""
    out: dict[str, str] = {}
    for m in marcs:
        if not tables.exists(m.feast_table):
            continue
        for col, values in distinct_values(tables, m.feast_table, list(FEATURE_LINEAGE)).items():
            out[f"{m.side}.{col}"] = ",".join(sorted(str(v) for v in values))
    return out


def state_views(store: FeatureStore, views: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The state views (Feast tag kind=state) among `views`, each with the field holding the newest event its
    rows hold (by the view's entity: NEWEST_EVENT_FIELDS)."""
    out = {}
    for fv in store.list_feature_views():
        if fv.name not in views or fv.tags.get("kind") != "state":
            continue
        sides = [e for e in fv.entities if e in NEWEST_EVENT_FIELDS]
        newest = NEWEST_EVENT_FIELDS[sides[0]] if len(sides) == 1 else None
        if newest is None or newest not in {f.name for f in fv.features}:
            raise TrainingSetError(
                f"state view {fv.name} (entities {fv.entities}) declares no newest-event field "
                f"({' or '.join(NEWEST_EVENT_FIELDS.values())}): the leakage gate cannot check it"
            )
        out[fv.name] = newest
    return dict(sorted(out.items()))


def time_refs(store: FeatureStore, views: dict[str, tuple[str, ...]]) -> list[str]:
    """What the gate reads besides the features: the lineage time fields of the MARC views in `views` that the
    repository declares, and the newest-event field of each state view."""
    declared = {v.name for v in store.list_feature_views()}
    marcs = [
        f"{m.lineage}:{f}" for m in marc_views_in(views) if m.lineage in declared for f in TIME_FIELDS[m.side]
    ]
    return marcs + [f"{view}:{f}" for view, f in state_views(store, views).items()]


def join_plan(
    store: FeatureStore, services: list[str]
) -> tuple[list[str], dict[str, tuple[str, ...]], list[MarcView], dict[str, str]]:
    """What a training set of these services joins: the feature references with the gate's time fields, the
    features per view, the MARC views and the state views (with their newest-event field)."""
    refs = [r for name in services for group in refs_by_view(store, name) for r in group]
    refs = list(dict.fromkeys(refs))
    views: dict[str, set[str]] = {}
    for r in refs:
        view, feature = r.split(":", 1)
        views.setdefault(view, set()).add(feature)
    features = {v: tuple(sorted(f)) for v, f in sorted(views.items())}
    joined = list(dict.fromkeys(refs + time_refs(store, features)))
    return joined, features, marc_views_in(features), state_views(store, features)


def build_frame(
    settings: Settings,
    tables: DeltaTables,
    store: FeatureStore,
    services: list[str],
    split: str | None = None,
) -> tuple[pd.DataFrame, Snapshot]:
    """Interactions (optionally one split) + the services' features, each as of the row's own time."""
    refs, features, marcs, states = join_plan(store, services)
    versions = delta_versions(tables, marcs, states)
    columns = ["user_id", "item_id", "event_timestamp", "label", "split"]
    sample = Sample(tables, settings.sample, {"interactions": versions["interactions"]})
    rows = sample.read("interactions", columns).to_pandas()  # the sampled users' rows (llmfeat/sample.py)
    as_of = pd.Timestamp(rows["event_timestamp"].max()).to_pydatetime()
    if split is not None:
        rows = rows[rows["split"] == split]
    rows = rows.reset_index(drop=True)
    rows[["user_id", "item_id"]] = rows[["user_id", "item_id"]].astype(str)
    frame = historical_features(store, rows, refs)
    if len(frame) != len(rows):
        raise TrainingSetError(
            f"the point-in-time join returned {len(frame)} of {len(rows)} interaction rows"
        )
    if delta_versions(tables, marcs, states) != versions:
        raise SnapshotChanged(f"Delta tables changed while the training set was built: {versions}")
    lineage = vector_lineage(tables, marcs)
    snapshot = Snapshot(as_of, versions, tuple(services), features, lineage, states)
    return frame, snapshot


def gate_columns(snapshot: Snapshot) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(view, field, gate column) of the lineage times and of the newest events the gate reads."""
    times = [
        (m.name, f, f"{m.name}_{f}") for m in marc_views_in(snapshot.features) for f in TIME_FIELDS[m.side]
    ]
    newest = [(view, f, f"{view}_{f}") for view, f in snapshot.newest_events.items()]
    return times, newest


def information_times(frame: Any, snapshot: Snapshot) -> tuple[Any, list[str], list[str]]:
    """What the training-set gate reads: keys, label, event time and, per vector view, when its value became
    valid and the newest behaviour it holds (null where the row has no value); per state view, the newest
    event the joined state holds, epoch microseconds (null: no earlier event). Returns the frame (pandas, or
    Spark for a set built on the executors), its timestamp columns and its newest-event columns."""
    times, newest = gate_columns(snapshot)
    for view, f, _ in times:
        if f not in frame.columns:
            raise TrainingSetError(f"the training set lacks {f} of {view}: re-run `llmfeat features`")
    for view, f, _ in newest:
        if f not in frame.columns:
            raise TrainingSetError(f"the training set lacks {f} of {view}: build it with build_frame")
    keys = ["user_id", "item_id", "event_timestamp", "label"]
    if isinstance(frame, pd.DataFrame):
        out = frame[keys].copy()
        out["event_timestamp"] = pd.to_datetime(out["event_timestamp"], utc=True)
        for _, f, column in times:
            out[column] = pd.to_datetime(frame[f], utc=True)
        for _, f, column in newest:
            out[column] = pd.to_numeric(frame[f]).astype("float64")  # epoch microseconds, NaN where none
    else:
        from pyspark.sql import functions as F

        out = frame.select(*keys, *(F.col(f).alias(c) for _, f, c in times),
                           *(F.col(f).cast("double").alias(c) for _, f, c in newest))  # fmt: skip
    return out, [c for *_, c in times], [c for *_, c in newest]


def check_training_set(
    settings: Settings, tables: DeltaTables, frame: pd.DataFrame, snapshot: Snapshot, name: str
) -> GateReport:
    """The training set's great-expectations gate: label rate, sane times, no feature from the future, no
    state holding the row's own event or a later one. Raises GateFailed (rows quarantined, nothing trained)
    or returns the report to link from the run."""
    from llmfeat.validation import gate, new_run_id, training_set_suite

    data, times, newest = information_times(frame, snapshot)
    strictly_before = [c for c in times if c.endswith("_history_until")]  # the row's own event is not in it
    suite = training_set_suite(
        times,
        name=name,
        conf=settings.validation,
        strictly_before=strictly_before,
        newest_events=newest,
    )
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


def gate_table(cfg: CtrConf, use_llm: bool) -> str:
    """The name the training set's gate reports under (its Data Docs page, the training run's tags)."""
    return f"training_set_{cfg.kind}_{'llm' if use_llm else 'id'}".replace("-", "_")


def checked_training_set(
    settings: Settings, tables: DeltaTables, store: FeatureStore, use_llm: bool
) -> tuple[pd.DataFrame, Snapshot, GateReport]:
    """The training set of the configured feature service, through its leakage gate (GateFailed stops it)."""
    frame, snapshot = build_frame(settings, tables, store, service_names(settings, use_llm))
    checked = check_training_set(settings, tables, frame, snapshot, gate_table(settings.ctr, use_llm))
    return frame, snapshot, checked


SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class TrainingSetSummary:
    """What a training set holds: rows and label rate per split, vector presence, what it was built from."""

    rows: dict[str, int]  # split -> rows
    label_rate: dict[str, float]  # split -> mean label
    described: dict[str, Any]  # describe(frame): rows, share of rows with each vector
    snapshot: Snapshot
    gate: str  # the gate's summary line
    written: str = ""  # the Delta table (and version) holding the set, when it was written (on Spark)

    def report(self) -> str:
        s = self.snapshot
        lines = [
            f"training set of {', '.join(s.services)} as of {s.as_of.isoformat()}: "
            f"{self.described['rows']:,} rows (point-in-time per row)"
        ]
        lines += [
            f"  {split}: {n:,} rows, label rate {self.label_rate[split]:.4f}"
            for split, n in self.rows.items()
        ]
        present = {k: v for k, v in self.described.items() if k.endswith("_present")}
        if present:
            lines.append(
                "  rows with a vector: " + ", ".join(f"{k[:-8]} {v:.1%}" for k, v in present.items())
            )
        lines.append("  feature views: " + ", ".join(s.views))
        lines.append("  Delta versions: " + ", ".join(f"{t}@{v}" for t, v in s.delta_versions.items()))
        if s.lineage:
            lines.append("  lineage: " + ", ".join(f"{k}={v}" for k, v in s.lineage.items()))
        lines.append(f"  gate: {self.gate}")
        if self.written:
            lines.append(f"  written to: {self.written}")
        return "\n".join(lines)


def summarise(frame: pd.DataFrame, snapshot: Snapshot, checked: GateReport) -> TrainingSetSummary:
    present = [s for s in SPLITS if (frame["split"] == s).any()]
    splits = [*present, *sorted(set(frame["split"].dropna()) - set(SPLITS))]
    by_split = {s: frame.loc[frame["split"] == s, "label"] for s in splits}
    return TrainingSetSummary(
        rows={s: len(labels) for s, labels in by_split.items()},
        label_rate={s: float(labels.mean()) for s, labels in by_split.items()},
        described=describe(frame),
        snapshot=snapshot,
        gate=checked.summary(),
    )


def run(spark: SparkSession | None, settings: Settings, use_llm: bool = True) -> TrainingSetSummary:
    """Build the point-in-time CTR training set of ctr.llm_feature_service (or, without LLM vectors,
    ctr.id_feature_service), run its leakage gate and describe it. Reads with delta-rs: `spark` is unused."""
    store, tables = open_store(settings), open_tables(settings)
    return summarise(*checked_training_set(settings, tables, store, use_llm))


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="training-set")
    config_args(parser)
    llm_args(parser)
    args = parser.parse_args(argv)
    return run_in_process(
        "training-set", args.config, args.overrides, lambda s: print(run(None, s, args.llm).report())
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.training_set import main as package_main

    sys.exit(package_main())
