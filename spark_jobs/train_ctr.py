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

Streaming (ctr.stream=true): the fitting reads the training set's Parquet files in bounded batches instead of
one frame (models/ctr/stream.py; the DNN in stream_train.py, LightGBM from Sequences in tree_stream.py), and
the valid and test rows are scored batch by batch. The set is the Delta table ctr.stream_table names, whole
(e.g. training_set_{service}, written by the Spark training-set job; its data files at its current version),
or, with ctr.stream_table empty, the set built here, written to scratch Parquet files that are removed after.
With ctr.stream_workers > 1 the DNN trains on that many processes on Spark's executors (TorchDistributor).

    llmfeat train-ctr --set ctr.stream=true [--set ctr.stream_table='training_set_{service}']
    llmfeat train-ctr --config cluster --set ctr.stream=true --set ctr.stream_workers=4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmfeat.delta_io import open_tables, version_files
from llmfeat.errors import UserError
from llmfeat.feast_repo import marc_views_in, open_store
from llmfeat.job_args import train_args
from llmfeat.models.ctr.features import FRESH_VECTORS, VECTOR_COLUMNS, FeatureEncoder
from llmfeat.models.ctr.model import CtrModel
from llmfeat.models.ctr.roles import ROLE_COLUMNS, row_roles
from llmfeat.models.ctr.stream import scan_files
from llmfeat.models.ctr.stream_train import StreamSource, fit_model_stream
from llmfeat.models.ctr.train import MetricLogger, after_marc, fit_model, model_config
from llmfeat.models.ctr.tree import fit_tree
from llmfeat.models.evaluation.ctr_eval import calibration_figure, flat_metrics, metric_intervals, roc_figure
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.registry import use_ctr_tracking
from llmfeat.spark_jobs.training_set import (
    Snapshot,
    checked_training_set,
    describe,
    service_names,
    split_masks,
)

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


@dataclass(frozen=True)
class Scored:
    """What the metrics, plots and signature read after fitting: the scored rows (label, user_id and
    whatever else they hold), their probabilities, valid / test masks, warm users, and example rows."""

    frame: pd.DataFrame
    p: np.ndarray
    masks: dict[str, np.ndarray]
    warm: np.ndarray
    example: pd.DataFrame


def example_rows(frame: pd.DataFrame, use_llm: bool) -> pd.DataFrame:
    """A few rows for the signature, with real vectors where the model reads them."""
    vectors = [c for c in (*VECTOR_COLUMNS, *FRESH_VECTORS) if use_llm and c in frame.columns]
    return frame.dropna(subset=vectors).head(5)


def score_in_memory(
    ranker: CtrRanker, frame: pd.DataFrame, masks: dict[str, np.ndarray], use_llm: bool
) -> Scored:
    warm = frame["user_id"].isin(set(frame.loc[masks["train"], "user_id"])).to_numpy()
    example = example_rows(frame[masks["test"]], use_llm)
    return Scored(frame, ranker.score(frame), masks, warm, example)


def write_scratch_set(frame: pd.DataFrame, folder: Path, file_rows: int) -> list[str]:
    """The in-process training set as Parquet files of `file_rows` rows (converted a slice at a time), for a
    stream to read back: the frame can go before training starts."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    paths = []
    for number, start in enumerate(range(0, len(frame), file_rows)):
        path = folder / f"part-{number:05d}.parquet"
        part = pa.Table.from_pandas(frame.iloc[start : start + file_rows], schema, preserve_index=False)
        pq.write_table(part, path)
        paths.append(str(path))
    return paths


def stream_table_files(settings: Settings, tables: DeltaTables, use_llm: bool) -> tuple[str, int, list[str]]:
    """ctr.stream_table for this feature service: its name, current version and that version's data files."""
    service = service_names(settings, use_llm)[0]
    name = settings.ctr.stream_table.format(service=service)
    version = tables.version(name) if tables.exists(name) else None
    if version is None:
        raise UserError(
            f"ctr.stream_table={settings.ctr.stream_table!r}: no Delta table {name} under {tables.root}; "
            "write the training set there first (the Spark training-set job), or leave ctr.stream_table "
            "empty to stream the set built in this process"
        )
    return name, version, version_files(tables, name, version)


def stream_source(settings: Settings, files: list[str]) -> StreamSource:
    """The files with the roles of their rows: split_masks' cut and, for the DNN, after_marc's."""
    cfg = settings.ctr
    after = settings.marc.fit_frac + settings.marc.stop_frac if cfg.kind != "lightgbm" else None
    roles = row_roles(lambda: scan_files(files, ROLE_COLUMNS, cfg.stream_batch_rows), cfg.stop_frac, after)
    return StreamSource(tuple(files), roles, cfg.stream_buffer_rows, cfg.stream_batch_rows)


def fit_streamed(
    settings: Settings, source: StreamSource, use_llm: bool, log_metrics: MetricLogger | None = None
) -> CtrRanker:
    """The ranker of family ctr.kind fitted over the stream (models/ctr/stream_train.py, tree_stream.py)."""
    from llmfeat.models.ctr.pyfunc import dnn_ranker, tree_ranker

    if settings.ctr.kind == "lightgbm":
        from llmfeat.models.ctr.tree_stream import fit_tree_stream  # imports lightgbm

        return tree_ranker(*fit_tree_stream(source, use_llm, settings.ctr, log_metrics))
    if settings.ctr.stream_workers > 1:
        return dnn_ranker(*fit_on_workers(settings.ctr, source, use_llm, log_metrics))
    return dnn_ranker(*fit_model_stream(source, use_llm, settings.ctr, log_metrics))


def fit_on_workers(
    cfg: CtrConf, source: StreamSource, use_llm: bool, log_metrics: MetricLogger | None
) -> tuple[CtrModel, FeatureEncoder]:
    """The DNN trained by ctr.stream_workers processes on the executors (pyspark's TorchDistributor, the
    active session's cluster); rank 0's model, encoder and epoch metrics come back to the driver."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=cfg.stream_workers, local_mode=False, use_gpu=False)
    output = distributor.run(train_on_worker, source, use_llm, cfg)
    if output is None:
        raise RuntimeError("TorchDistributor returned nothing from rank 0: see the executors' logs")
    state, encoder, logged = output
    model = CtrModel(model_config(cfg, encoder))
    model.load_state_dict(state)
    model.eval()
    for metrics, step in logged:
        if log_metrics is not None:
            log_metrics(metrics, step)
    return model, encoder


def train_on_worker(
    source: StreamSource, use_llm: bool, cfg: CtrConf
) -> tuple[dict[str, Any], FeatureEncoder, list[tuple[dict[str, float], int]]]:
    """One worker's training (run by TorchDistributor in each process): join the group, stream this worker's
    share of the files, return the model's state, the encoder and the epoch metrics."""
    from llmfeat.models.ctr.workers import Workers

    workers = Workers.join()
    logged: list[tuple[dict[str, float], int]] = []
    try:
        model, encoder = fit_model_stream(
            source, use_llm, cfg, lambda m, step: logged.append((dict(m), step)), workers
        )
    finally:
        workers.leave()
    return model.state_dict(), encoder, logged


def score_streamed(ranker: CtrRanker, source: StreamSource, use_llm: bool) -> Scored:
    """The valid and test rows scored batch by batch; kept of them: label, user_id and the probability."""
    columns = source.schema().names
    train_users = {u for b in source.scan(["user_id"], "train") for u in b.column("user_id").to_pylist()}
    kept: list[pd.DataFrame] = []
    probabilities: list[np.ndarray] = []
    examples: list[pd.DataFrame] = []
    for role in ("valid", "test"):
        for batch in source.scan(columns, role):
            frame = batch.to_pandas()
            probabilities.append(ranker.score(frame))
            kept.append(frame[["label", "user_id"]].assign(role=role))
            if role == "test" and sum(len(e) for e in examples) < 5:
                examples.append(example_rows(frame, use_llm))
    scored = pd.concat(kept, ignore_index=True)
    masks = {role: (scored["role"] == role).to_numpy() for role in ("valid", "test")}
    warm = scored["user_id"].isin(train_users).to_numpy()
    example = pd.concat(examples, ignore_index=True).head(5) if examples else frame.head(0)
    return Scored(scored, np.concatenate(probabilities), masks, warm, example)


def train_and_register(
    settings: Settings, tables: DeltaTables, store: FeatureStore, use_llm: bool, alias: str | None = None
) -> TrainedCtr:
    """Build the training set from Feast, train, evaluate, log and register (and set `alias`). With
    ctr.stream and ctr.stream_table, the set is that Delta table, streamed: no join here."""
    import mlflow

    from llmfeat.validation.data_docs import link_inputs, link_to_mlflow, locations

    cfg = settings.ctr
    use_ctr_tracking(settings)
    if cfg.stream and cfg.stream_table:
        return train_on_table(settings, tables, use_llm, alias)
    frame, snapshot, checked = checked_training_set(settings, tables, store, use_llm)
    masks = split_masks(frame, cfg.stop_frac)
    tags = run_tags(snapshot, cfg, use_llm)
    with mlflow.start_run(run_name=f"train-{run_label(cfg, use_llm)}", tags=tags) as run:
        client = mlflow.MlflowClient()
        link_to_mlflow(client, run.info.run_id, checked)
        marc_tables = [m.feast_table for m in marc_views_in(snapshot.views)]
        inputs = ["interactions", *marc_tables, "feast_item_meta"]
        link_inputs(client, run.info.run_id, locations(settings)[0].parent, inputs)
        mlflow.log_params({f"ctr.{k}": v for k, v in cfg.model_dump().items()} | describe(frame))
        if cfg.stream:  # the set goes to files and the frame away: training holds a buffer of rows
            with tempfile.TemporaryDirectory(prefix="train-ctr-stream-", dir=settings.data_dir) as folder:
                files = write_scratch_set(frame, Path(folder), cfg.stream_buffer_rows)
                del frame
                ranker, scored = fit_and_score_streamed(settings, files, use_llm)
        else:
            ranker = fit_ranker(settings, frame, masks, use_llm, mlflow.log_metrics)
            scored = score_in_memory(ranker, frame, masks, use_llm)
        version, results = log_and_register(ranker, scored, cfg, run_label(cfg, use_llm))
    return set_version_tags(cfg, version, run.info.run_id, tags, alias, use_llm, results)


def train_on_table(settings: Settings, tables: DeltaTables, use_llm: bool, alias: str | None) -> TrainedCtr:
    """Train over the Delta table ctr.stream_table names (gated when it was written), streamed whole."""
    import mlflow

    cfg = settings.ctr
    table, table_version, files = stream_table_files(settings, tables, use_llm)
    tags = {
        "ctr.kind": cfg.kind,
        "model.family": cfg.kind,
        "ctr.uses_llm": str(use_llm).lower(),
        "feast.feature_service": service_names(settings, use_llm)[0],
        "training_set.table": table,
        f"delta.{table}.version": str(table_version),
    }
    with mlflow.start_run(run_name=f"train-{run_label(cfg, use_llm)}", tags=tags) as run:
        mlflow.log_params(
            {f"ctr.{k}": v for k, v in cfg.model_dump().items()} | {"training_set.files": len(files)}
        )
        ranker, scored = fit_and_score_streamed(settings, files, use_llm)
        version, results = log_and_register(ranker, scored, cfg, run_label(cfg, use_llm))
    return set_version_tags(cfg, version, run.info.run_id, tags, alias, use_llm, results)


def run_label(cfg: CtrConf, use_llm: bool) -> str:
    return f"{cfg.kind}-{'llm' if use_llm else 'id'}"


def fit_and_score_streamed(settings: Settings, files: list[str], use_llm: bool) -> tuple[CtrRanker, Scored]:
    import mlflow

    source = stream_source(settings, files)
    ranker = fit_streamed(settings, source, use_llm, mlflow.log_metrics)
    return ranker, score_streamed(ranker, source, use_llm)


def log_and_register(
    ranker: CtrRanker, scored: Scored, cfg: CtrConf, label: str
) -> tuple[str, dict[str, dict[str, Interval]]]:
    """In the open run: metrics with intervals, plots, and the ranker registered; its version and the
    intervals."""
    import mlflow

    from llmfeat.models.ctr.pyfunc import log_ranker

    results = evaluate(scored.frame, scored.p, scored.masks, scored.warm, cfg.n_boot)
    for subset, intervals in results.items():
        mlflow.log_metrics(flat_metrics(subset, intervals))
    log_plots(scored.frame, scored.p, scored.masks["test"], label)
    info = log_ranker(ranker, scored.example, cfg.registry_name)
    return str(info.registered_model_version), results


def set_version_tags(
    cfg: CtrConf,
    version: str,
    run_id: str,
    tags: dict[str, str],
    alias: str | None,
    use_llm: bool,
    results: dict[str, dict[str, Interval]],
) -> TrainedCtr:
    """The run's tags on the registered version (and `alias` on it)."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registry_name, version, key, value)
    client.set_model_version_tag(cfg.registry_name, version, "train_run_id", run_id)
    if alias:
        client.set_registered_model_alias(cfg.registry_name, alias, version)
    test, valid = results["test"], results["valid"]
    return TrainedCtr(cfg.registry_name, version, run_id, use_llm, alias, test, valid, cfg.kind)


def run(
    spark: SparkSession | None,
    settings: Settings,
    use_llm: bool = True,
    alias: str | None = None,
    both: bool = False,
) -> list[TrainedCtr]:
    """Train one ranker, with or without LLM vectors, and set `alias` on it; with `both`, the model without
    LLM vectors under serving.champion_alias and the one with them under serving.challenger_alias.
    Reads with delta-rs; `spark`: the session whose executors run the workers (ctr.stream_workers > 1),
    else unused."""
    if settings.ctr.stream_workers > 1 and spark is None:
        raise UserError(
            f"ctr.stream_workers={settings.ctr.stream_workers} trains on Spark's executors: run train-ctr "
            "with a session (`llmfeat train-ctr` and spark-submit start one for it)"
        )
    store, tables = open_store(settings), open_tables(settings)
    plan: list[tuple[bool, str | None]] = [(use_llm, alias)]
    if both:
        plan = [(False, settings.serving.champion_alias), (True, settings.serving.challenger_alias)]
    return [train_and_register(settings, tables, store, llm, name) for llm, name in plan]


def worker_session(settings: Settings) -> SparkSession | None:
    """The Spark session the stream's workers run in (ctr.stream_workers > 1); None: no Spark needed."""
    if settings.ctr.stream_workers <= 1:
        return None
    from llmfeat.session import build_session

    return build_session(settings.spark, settings.delta)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="train-ctr")
    config_args(parser)
    train_args(parser)
    args = parser.parse_args(argv)

    def body(settings: Settings) -> None:
        for trained in run(worker_session(settings), settings, args.llm, args.alias, args.both):
            print(trained.summary())

    return run_in_process("train-ctr", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.train_ctr import main as package_main

    sys.exit(package_main())
