"""Offline A/B of two registered CTR models, and promotion of the challenger by a rule (`promotion.*`).

    llmfeat compare [--a champion] [--b challenger]     # prints the side-by-side table, decision and reason
    spark-submit spark_jobs/compare.py --config local [--a champion] [--b challenger]
    llmfeat promote                                     # moves champion only when the comparison passes

Both models score the same held-out snapshot: the test split of one pinned `interactions` version, joined
once with the union of both models' feature services as of one snapshot time (spark_jobs/training_set.py),
so each sees exactly the same rows and Delta versions. Per metric: value with a 95% bootstrap interval per
model, the paired difference (b - a) with its interval, DeLong's test for AUC. One MLflow run per comparison
(experiment ctr.experiment) with the table, a ROC plot, the decision, its reason and both model versions.

Promotion rule (config `promotion`): b passes when the lower end of the AUC-difference interval exceeds
promotion.min_auc_lift, the user-resampled p is below promotion.max_delong_p, and the upper end of the
LogLoss-difference interval is at most promotion.max_logloss_increase.

Needs no Spark (Delta is read with delta-rs, features come from Feast): `run` takes `spark=None`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmfeat.delta_io import open_tables
from llmfeat.errors import UserError
from llmfeat.feast_repo import open_store
from llmfeat.models.evaluation.ab_stats import delong_test, paired_differences
from llmfeat.models.evaluation.ctr_eval import METRICS, metric_intervals, roc_figure
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.registry import ModelRef, resolve, use_ctr_tracking
from llmfeat.spark_jobs.training_set import Snapshot, build_frame

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession

    from llmfeat.config import PromotionConf, Settings
    from llmfeat.delta_io import DeltaTables


@dataclass(frozen=True)
class Comparison:
    a: ModelRef
    b: ModelRef
    rows: int
    metrics_a: dict[str, Interval]
    metrics_b: dict[str, Interval]
    diff: dict[str, Interval]  # b - a
    delong_p: float
    passed: bool
    reason: str
    run_id: str = ""
    slices: dict[str, tuple[int, int, Interval]] = field(
        default_factory=dict
    )  # name -> rows, users, AUC b - a

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "metric": [m.upper() for m in METRICS],
                self.a.label(): [str(self.metrics_a[m]) for m in METRICS],
                self.b.label(): [str(self.metrics_b[m]) for m in METRICS],
                "b - a [95% CI]": [str(self.diff[m]) for m in METRICS],
            }
        )

    def report(self) -> str:
        decision = "PASS: promote the challenger" if self.passed else "KEEP the champion"
        return "\n".join(
            [
                f"offline A/B on {self.rows:,} held-out rows (test split, point-in-time features, the same "
                "rows for both); 95% intervals resample users (all rows of a user together):",
                self.table().to_string(index=False),
                f"paired AUC difference, users resampled: p = {self.diff['auc_p'].mean:.3g}; DeLong's test "
                f"(rows as independent, for reference): p = {self.delong_p:.3g}",
                *self.slice_lines(),
                f"decision: {decision}",
                f"reason: {self.reason}",
            ]
        )

    def slice_lines(self) -> list[str]:
        """AUC(b) - AUC(a) by slice (models/evaluation/slices.py), each with its rows and users."""
        if not self.slices:
            return []
        lines = ["AUC b - a by slice (what was known before each row; same user resamples):"]
        for name, (rows, users, iv) in self.slices.items():
            lines.append(f"  {name:<32} {rows:>7,} rows {users:>5} users  {iv.mean:+.4f} [{iv.low:+.4f}, "
                         f"{iv.high:+.4f}]")  # fmt: skip
        return lines


def promotion_decision(diff: dict[str, Interval], delong_p: float, rule: PromotionConf) -> tuple[bool, str]:
    checks = [
        (
            diff["auc"].low > rule.min_auc_lift,
            f"AUC diff low {diff['auc'].low:+.4f} > {rule.min_auc_lift:+.4f}",
        ),
        (
            diff["auc"].mean > 0 and diff["auc_p"].mean < rule.max_delong_p,
            f"user-resampled p {diff['auc_p'].mean:.3g} < {rule.max_delong_p:g} with AUC(b) > AUC(a)",
        ),
        (
            diff["logloss"].high <= rule.max_logloss_increase,
            f"LogLoss diff high {diff['logloss'].high:+.4f} <= {rule.max_logloss_increase:+.4f}",
        ),
    ]
    held = [text for ok, text in checks if ok]
    failed = [text for ok, text in checks if not ok]
    if not failed:
        return True, "every promotion check holds: " + "; ".join(held)
    return False, "promotion rule not met: fails " + "; ".join(failed) + (
        f" (holds: {'; '.join(held)})" if held else ""
    )


def score_snapshot(
    settings: Settings, tables: DeltaTables, store: FeatureStore, a: ModelRef, b: ModelRef
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, Snapshot]:
    """The test split with the union of both models' features, scored by both pinned versions."""
    from llmfeat.models.ctr.pyfunc import load_ranker

    services = sorted({a.feature_service, b.feature_service})
    frame, snapshot = build_frame(settings, tables, store, services, split="test")
    return frame, load_ranker(a.uri).score(frame), load_ranker(b.uri).score(frame), snapshot


def compare(
    settings: Settings, tables: DeltaTables, store: FeatureStore, a_alias: str, b_alias: str
) -> Comparison:
    """Offline A/B of name@a_alias vs name@b_alias, logged as one MLflow run."""
    import mlflow

    use_ctr_tracking(settings)
    a, b = (resolve(settings.ctr.registry_name, x) for x in (a_alias, b_alias))
    if a.version == b.version:
        raise UserError(f"{a_alias} and {b_alias} are the same version ({a.version}): nothing to compare")
    frame, p_a, p_b, snapshot = score_snapshot(settings, tables, store, a, b)
    y, users, n_boot = frame["label"].to_numpy(float), frame["user_id"].to_numpy(), settings.ctr.n_boot
    diff = paired_differences(y, p_a, p_b, users, n_boot=n_boot, seed=settings.ctr.seed)
    _, _, p_value = delong_test(y, p_b, p_a)
    passed, reason = promotion_decision(diff, p_value, settings.promotion)
    result = Comparison(
        a, b, len(frame), metric_intervals(y, p_a, users, n_boot), metric_intervals(y, p_b, users, n_boot),
        diff, p_value, passed, reason,
        slices=slice_differences(settings, tables, frame, snapshot, p_a, p_b),
    )  # fmt: skip
    tags = snapshot.tags() | {
        "compare.a": a.uri, "compare.b": b.uri, "compare.a_alias": a_alias, "compare.b_alias": b_alias,
        "compare.passed": str(passed).lower(), "compare.reason": reason,
        "compare.a_train_run": a.run_id, "compare.b_train_run": b.run_id,
    }  # fmt: skip
    with mlflow.start_run(run_name=f"compare-v{a.version}-vs-v{b.version}", tags=tags) as run:
        _log_comparison(result, frame, p_a, p_b)
    return Comparison(**{**result.__dict__, "run_id": run.info.run_id})


def slice_differences(
    settings: Settings, tables: DeltaTables, frame: pd.DataFrame, snapshot: Snapshot, p_a: np.ndarray,
    p_b: np.ndarray,
) -> dict[str, tuple[int, int, Interval]]:  # fmt: skip
    """AUC(b) - AUC(a) on each history slice of the scored rows with at least 20 rows and both labels, over
    one set of user resamples. The slices count the pinned interactions strictly before each row."""
    from llmfeat.models.ctr.history import epoch_micros
    from llmfeat.models.evaluation.ab_stats import paired_deltas
    from llmfeat.models.evaluation.metrics import user_weights
    from llmfeat.models.evaluation.slices import history_slices
    from llmfeat.sample import Sample

    ids = ["user_id", "item_id"]  # with the time, an interaction row's key
    versions = {"interactions": snapshot.delta_versions.get("interactions")}
    inter = (
        Sample(tables, settings.sample, versions)
        .read("interactions", [*ids, "event_timestamp", "label"])
        .to_pandas()
    )
    micros = epoch_micros(inter["event_timestamp"])
    masks = history_slices(pd.factorize(inter["user_id"])[0], pd.factorize(inter["item_id"])[0], micros,
                           inter["label"].to_numpy(np.int64))  # fmt: skip
    # each scored row's position in the interactions (-1: not there, in no slice)
    right = inter[ids].assign(micros=micros, _row=np.arange(len(inter)))
    left = frame[ids].assign(micros=epoch_micros(frame["event_timestamp"]))
    rows = left.merge(right, on=[*ids, "micros"], how="left")["_row"].fillna(-1).to_numpy(np.int64)
    found = rows >= 0
    y, users = frame["label"].to_numpy(np.float64), frame["user_id"].to_numpy()
    weights = user_weights(users, settings.ctr.n_boot, settings.ctr.seed)
    out = {}
    for name, mask in masks.items():
        m = found & mask[np.where(found, rows, 0)]
        if m.sum() >= 20 and 0 < y[m].sum() < m.sum():
            iv = paired_deltas(y[m], p_a[m], p_b[m], weights[:, m])["auc"]
            out[name] = (int(m.sum()), len(set(users[m])), iv)
    return out


def run(
    spark: SparkSession | None, settings: Settings, a: str = "champion", b: str = "challenger"
) -> Comparison:
    """The offline A/B of ctr.registry_name@a against @b (see the module docstring), logged as one MLflow
    run. Reads with delta-rs: `spark` is unused."""
    store, tables = open_store(settings), open_tables(settings)
    return compare(settings, tables, store, a, b)


def _log_comparison(c: Comparison, frame: pd.DataFrame, p_a: np.ndarray, p_b: np.ndarray) -> None:
    import mlflow

    metrics = {"rows": float(c.rows), "delong_p": c.delong_p}
    for prefix, values in (("a", c.metrics_a), ("b", c.metrics_b), ("diff", c.diff)):
        for m, iv in values.items():
            metrics |= {f"{prefix}_{m}": iv.mean, f"{prefix}_{m}_low": iv.low, f"{prefix}_{m}_high": iv.high}
    for name, (rows, users, iv) in c.slices.items():
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        metrics |= {f"slice_{slug}_diff_auc": iv.mean, f"slice_{slug}_diff_auc_low": iv.low,
                    f"slice_{slug}_diff_auc_high": iv.high, f"slice_{slug}_rows": float(rows),
                    f"slice_{slug}_users": float(users)}  # fmt: skip
    mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_table(c.table(), "comparison.json")
    mlflow.log_text(c.report(), "comparison.txt")
    y = frame["label"].to_numpy()
    curves = {c.a.label(): (y, p_a), c.b.label(): (y, p_b)}
    mlflow.log_figure(roc_figure(curves, "ROC, same held-out snapshot"), "plots/roc_compare.png")
    mlflow.log_figure(_interval_figure(c), "plots/metric_intervals.png")


def _interval_figure(c: Comparison):  # type: ignore[no-untyped-def]
    """Per metric: both models' values with 95% intervals, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    for ax, m in zip(fig.subplots(1, len(METRICS)), METRICS, strict=True):
        for x, iv in enumerate((c.metrics_a[m], c.metrics_b[m])):
            ax.errorbar([x], [iv.mean], yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", capsize=4)
        ax.set_xticks([0, 1], [c.a.label(), c.b.label()])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(m.upper())
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Promotion:
    comparison: Comparison
    moved: bool
    champion_version: str

    def report(self) -> str:
        return f"{self.comparison.report()}\n{self.summary()}"

    def summary(self) -> str:
        c = self.comparison
        if self.moved:
            head = f"promoted: champion {c.a.version} -> {c.b.version}"
        else:
            head = f"champion stays at version {c.a.version}"
        return f"{head}: {c.reason} (comparison run {c.run_id})"


def promote(
    settings: Settings, tables: DeltaTables, store: FeatureStore, champion: str, challenger: str
) -> Promotion:
    """Compare, then move `champion` to the challenger's version only when the promotion rule passes; the
    decision and its reason are recorded on the challenger's model version and on the comparison run."""
    return record_promotion(settings, compare(settings, tables, store, champion, challenger))


def record_promotion(settings: Settings, c: Comparison) -> Promotion:
    """Apply a finished comparison's promotion decision: move the champion alias (a) or not; record why."""
    import mlflow

    champion = c.a.alias
    client = mlflow.MlflowClient()
    name = settings.ctr.registry_name
    record = {
        "promotion.decision": "promoted" if c.passed else "rejected",
        "promotion.reason": c.reason,
        "promotion.comparison_run": c.run_id,
        "promotion.against_version": c.a.version,
    }
    for key, value in record.items():
        client.set_model_version_tag(name, c.b.version, key, value)
    client.set_tag(c.run_id, "promotion.decision", record["promotion.decision"])
    if c.passed:
        client.set_registered_model_alias(name, f"previous-{champion}", c.a.version)
        client.set_registered_model_alias(name, champion, c.b.version)
    return Promotion(c, c.passed, c.b.version if c.passed else c.a.version)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="compare")
    config_args(parser)
    parser.add_argument("--a", default="champion")
    parser.add_argument("--b", default="challenger")
    args = parser.parse_args(argv)
    return run_in_process(
        "compare", args.config, args.overrides, lambda s: print(run(None, s, args.a, args.b).report())
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.compare import main as package_main

    sys.exit(package_main())
