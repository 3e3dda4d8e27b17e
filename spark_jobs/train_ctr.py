"""Train a CTR ranker from a Feast training set, track it in MLflow and register it under an alias.

    llmfeat train-ctr [--llm | --no-llm | --both] [--alias challenger] [--set ctr.kind=dnn]
    spark-submit spark_jobs/train_ctr.py --config local --both
    mlflow run mlflow -e train -P llm=llm -P alias=challenger

One MLflow run per model: params (model and trainer config), per-epoch train loss and valid AUC / LogLoss,
final AUC / GAUC / LogLoss with 95% bootstrap intervals on valid and test (test also for warm and cold users),
ROC and calibration plots, lineage tags (feature service and views, Delta versions, encoder, layer,
compressor version, snapshot time). The model is registered as a pyfunc (models/ctr/pyfunc.py) with
signature, input example and pip requirements; its version carries the same lineage tags.

The fitting itself (torch only) is models/ctr/train.py; the training set, spark_jobs/training_set.py. Needs no
Spark (Delta is read with delta-rs, features come from Feast): `run` takes `spark=None`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmfeat.delta_io import open_tables
from llmfeat.feast_repo import marc_views_in, open_store
from llmfeat.models.ctr.features import FRESH_VECTORS, VECTOR_COLUMNS
from llmfeat.models.ctr.train import MetricLogger, after_marc, fit_model
from llmfeat.models.ctr.tree import fit_tree
from llmfeat.models.evaluation.ctr_eval import calibration_figure, flat_metrics, metric_intervals, roc_figure
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.registry import use_ctr_tracking
from llmfeat.spark_jobs.training_set import Snapshot, checked_training_set, describe, split_masks

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession

    from llmfeat.config import CtrConf, Settings
    from llmfeat.delta_io import DeltaTables
    from llmfeat.models.ctr.pyfunc import CtrRanker


@dataclass(frozen=True)
class TrainedCtr:
    name: str  # registered model name
    version: str
    run_id: str
    uses_llm: bool
    alias: str | None
    test: dict[str, Interval]
    valid: dict[str, Interval]
    family: str = "deepfm"

    def summary(self) -> str:
        kind = f"{self.family}, {'with' if self.uses_llm else 'without'} LLM features"
        alias = f" @{self.alias}" if self.alias else ""
        metrics = "  ".join(f"{k.upper()} {v}" for k, v in self.test.items())
        return f"{self.name} v{self.version}{alias} ({kind}) test: {metrics}"


def evaluate(
    frame: pd.DataFrame, p: np.ndarray, masks: dict[str, np.ndarray], warm: np.ndarray, n_boot: int
) -> dict[str, dict[str, Interval]]:
    """valid, test, test_warm, test_cold -> AUC / GAUC / LogLoss intervals."""
    y, users = frame["label"].to_numpy(np.float64), frame["user_id"].to_numpy()
    subsets = {
        "valid": masks["valid"],
        "test": masks["test"],
        "test_warm": masks["test"] & warm,
        "test_cold": masks["test"] & ~warm,
    }
    return {
        name: metric_intervals(y[m], p[m], users[m], n_boot) for name, m in subsets.items() if m.sum() > 1
    }


def log_plots(frame: pd.DataFrame, p: np.ndarray, test: np.ndarray, label: str) -> None:
    import mlflow

    curve = {label: (frame["label"].to_numpy()[test], p[test])}
    mlflow.log_figure(roc_figure(curve, "ROC, test split"), "plots/roc_test.png")
    mlflow.log_figure(calibration_figure(curve, "Calibration, test split"), "plots/calibration_test.png")


def run_tags(snapshot: Snapshot, cfg: CtrConf, use_llm: bool) -> dict[str, str]:
    service = cfg.llm_feature_service if use_llm else cfg.id_feature_service
    return snapshot.tags() | {
        "ctr.kind": cfg.kind,
        "model.family": cfg.kind,
        "ctr.uses_llm": str(use_llm).lower(),
        "feast.feature_service": service,
    }


def fit_ranker(
    settings: Settings,
    frame: pd.DataFrame,
    masks: dict[str, np.ndarray],
    use_llm: bool,
    log_metrics: MetricLogger | None = None,
) -> CtrRanker:
    """The ranker of family ctr.kind fitted on the frame: LightGBM, or the DNN's id part and LLM branch."""
    from llmfeat.models.ctr.pyfunc import dnn_ranker, tree_ranker

    cfg = settings.ctr
    if cfg.kind == "lightgbm":
        return tree_ranker(*fit_tree(frame, masks, use_llm, cfg, log_metrics))
    residual_rows = after_marc(frame, settings.marc)
    return dnn_ranker(*fit_model(frame, masks, use_llm, cfg, log_metrics, residual_rows))


def train_and_register(
    settings: Settings, tables: DeltaTables, store: FeatureStore, use_llm: bool, alias: str | None = None
) -> TrainedCtr:
    """Build the training set from Feast, train, evaluate, log and register (and set `alias`)."""
    import mlflow

    from llmfeat.models.ctr.pyfunc import log_ranker
    from llmfeat.validation.data_docs import link_inputs, link_to_mlflow, locations

    cfg = settings.ctr
    frame, snapshot, checked = checked_training_set(settings, tables, store, use_llm)
    label = f"{cfg.kind}-{'llm' if use_llm else 'id'}"
    masks = split_masks(frame, cfg.stop_frac)
    use_ctr_tracking(settings)
    tags = run_tags(snapshot, cfg, use_llm)
    with mlflow.start_run(run_name=f"train-{label}", tags=tags) as run:
        link_to_mlflow(mlflow.MlflowClient(), run.info.run_id, checked)
        marc_tables = [m.feast_table for m in marc_views_in(snapshot.views)]
        inputs = ["interactions", *marc_tables, "feast_item_meta"]
        link_inputs(mlflow.MlflowClient(), run.info.run_id, locations(settings)[0].parent, inputs)
        mlflow.log_params({f"ctr.{k}": v for k, v in cfg.model_dump().items()} | describe(frame))
        ranker = fit_ranker(settings, frame, masks, use_llm, mlflow.log_metrics)
        p = ranker.score(frame)
        warm = frame["user_id"].isin(set(frame.loc[masks["train"], "user_id"])).to_numpy()
        results = evaluate(frame, p, masks, warm, cfg.n_boot)
        for subset, intervals in results.items():
            mlflow.log_metrics(flat_metrics(subset, intervals))
        log_plots(frame, p, masks["test"], label)
        vectors = [c for c in (*VECTOR_COLUMNS, *FRESH_VECTORS) if use_llm and c in frame.columns]
        example = frame[masks["test"]].dropna(subset=vectors).head(5)  # a signature needs real vectors
        info = log_ranker(ranker, example, cfg.registry_name)
        version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registry_name, version, key, value)
    client.set_model_version_tag(cfg.registry_name, version, "train_run_id", run.info.run_id)
    if alias:
        client.set_registered_model_alias(cfg.registry_name, alias, version)
    test, valid = results["test"], results["valid"]
    return TrainedCtr(cfg.registry_name, version, run.info.run_id, use_llm, alias, test, valid, cfg.kind)


def run(
    spark: SparkSession | None,
    settings: Settings,
    use_llm: bool = True,
    alias: str | None = None,
    both: bool = False,
) -> list[TrainedCtr]:
    """Train one ranker, with or without LLM vectors, and set `alias` on it; with `both`, the model without
    LLM vectors under serving.champion_alias and the one with them under serving.challenger_alias.
    Reads with delta-rs: `spark` is unused."""
    store, tables = open_store(settings), open_tables(settings)
    plan: list[tuple[bool, str | None]] = [(use_llm, alias)]
    if both:
        plan = [(False, settings.serving.champion_alias), (True, settings.serving.challenger_alias)]
    return [train_and_register(settings, tables, store, llm, name) for llm, name in plan]


def train_args(parser: argparse.ArgumentParser) -> None:
    from llmfeat.spark_jobs.training_set import llm_args

    which = llm_args(parser)
    which.add_argument("--both", action="store_true", help="without LLM -> champion, with -> challenger")
    parser.add_argument("--alias", default=None, help="registry alias to set on the new version")


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="train-ctr")
    config_args(parser)
    train_args(parser)
    args = parser.parse_args(argv)

    def body(settings: Settings) -> None:
        for trained in run(None, settings, args.llm, args.alias, args.both):
            print(trained.summary())

    return run_in_process("train-ctr", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.train_ctr import main as package_main

    sys.exit(package_main())
