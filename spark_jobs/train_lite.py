"""Train and compare next-item models on the time split: popularity, SASRec (IDs only), Lite-LLM4Rec.

    llmfeat train-lite [--config local|PATH] [--set lite.layer=15 --set lite.publish_k=50 ...]

Reads interactions, items and `items_repr` (layer `lite.layer`) from <data_dir>/delta with delta-rs
(no Spark at this size). Trains on the train split's sequences, early-stops on the valid split's NDCG@k, and
ranks every item for each test event (input = the user's newest `lite.max_seq` earlier events; excluded
from the ranking = ALL the user's earlier events). Reports Recall@k and NDCG@k on all, warm and cold test
queries: the mean over `lite.seeds` with a bootstrap interval that resamples users (all of a user's queries
together) and a t interval over seeds. Logs one MLflow run per model with the item vectors' lineage; with
`lite.publish_k` > 0 writes each user's top candidates of the Lite-LLM4Rec model (models/lite_llm4rec/
candidates.py) to the Delta table `lite.candidates_table`, after its gate (Feast view user_candidates_fv).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmfeat.config import ConfigError
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.models.evaluation.rank_metrics import (
    RankReport,
    ndcg_at,
    paired_difference,
    popularity_scorer,
    rank_queries,
    rank_report,
)
from llmfeat.models.lite_llm4rec.data import (
    LiteData,
    Queries,
    Windows,
    eval_queries,
    event_log,
    train_windows,
)
from llmfeat.models.trainer import TrainConfig, TrainHistory, train_early_stopping
from llmfeat.reprs import layer_lineage, layer_matrix, repr_table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import LiteConf, Settings
    from llmfeat.models.lite_llm4rec.data import LiteData
    from llmfeat.models.lite_llm4rec.model import NextItemModel
    from llmfeat.validation.gating import GateReport

log = logging.getLogger("llmfeat.lite")
PARTS = ("all", "warm", "cold")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # training and ranking; results come back as numpy


@dataclass
class ModelResult:
    name: str
    reports: dict[str, RankReport]  # part -> report
    best_epochs: list[int] = field(default_factory=list)
    valid_ndcg: list[float] = field(default_factory=list)
    run_id: str = ""
    ranks: np.ndarray | None = None  # (S, Q) test ranks per seed, for paired differences


@dataclass
class LiteSummary:
    results: list[ModelResult]
    k: int
    n_test: int
    skipped_empty: int
    lineage: dict[str, Any]
    published: str = ""
    differences: dict[str, dict[str, tuple[Interval, Interval]]] = field(default_factory=dict)  # a - b, part

    def __str__(self) -> str:
        k = self.k
        lines = [
            f"next-item, full ranking over all items, each user's whole history excluded: {self.n_test:,} "
            f"test queries ({self.skipped_empty:,} test events without history skipped); "
            f"item vectors {self.lineage}",
            f"{'model':<12}{'part':<6}{'n':>7}{'users':>6}  {f'Recall@{k} [95% users]':<27}"
            f"{f'NDCG@{k} [95% users]':<27}{'NDCG seeds [95% t]'}",
        ]
        for r in self.results:
            for part in PARTS:
                rep = r.reports[part]
                lines.append(f"{r.name:<12}{part:<6}{rep.n:>7}{rep.users:>6}  {rep.recall!s:<27}"
                             f"{rep.ndcg!s:<27}{rep.ndcg_seeds}")  # fmt: skip
        for pair, parts in self.differences.items():
            for part, (rec, nd) in parts.items():
                lines.append(f"{pair:<22}{part:<6}  Recall@{k} {rec!s:<27}NDCG@{k} {nd}  (paired, users)")
        if self.published:
            lines.append(self.published)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- data


def load_lite_data(settings: Settings) -> LiteData:
    """The event log, windows, queries and the item vectors of `lite.layer` (delta-rs reads)."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.sample import Sample

    cfg, tables = settings.lite, RustDelta(settings.delta_root)
    if not tables.exists(repr_table("items")):
        raise FileNotFoundError(
            f"no items_repr table under {settings.delta_root}: run `llmfeat encode --entity items` first"
        )
    sample = Sample(tables, settings.sample)  # llmfeat/sample.py
    inter = sample.read("interactions")
    ev = event_log(inter, sample.items_of(inter))
    item_reprs = sample.read(repr_table("items"), item_id=ev.item_keys)
    vectors = layer_matrix(item_reprs, "items", cfg.layer, ev.item_keys)
    lineage = layer_lineage(item_reprs, repr_table("items"), cfg.layer)
    lineage["items_repr_version"] = tables.version(repr_table("items"))
    lineage["interactions_version"] = tables.version("interactions")
    return LiteData(
        ev,
        train_windows(ev, cfg.max_seq),
        sample_queries(eval_queries(ev, "valid", cfg.max_seq), cfg.valid_queries),
        eval_queries(ev, "test", cfg.max_seq),
        vectors,
        lineage,
    )


def sample_queries(q: Queries, n: int, seed: int = 0) -> Queries:
    """A fixed random sample of n queries (all when n is 0 or larger than Q): early stopping only."""
    if n <= 0 or n >= len(q):
        return q
    keep = np.sort(np.random.default_rng(seed).choice(len(q), n, replace=False))
    return q.take(keep)


# ---------------------------------------------------------------------------------------------- training


def build_model(kind: str, cfg: LiteConf, n_items: int, item_vectors: np.ndarray) -> NextItemModel:
    from llmfeat.models.lite_llm4rec.model import LiteLLM4Rec
    from llmfeat.models.lite_llm4rec.sasrec import SASRec, SeqConfig

    seq = SeqConfig(n_items, cfg.max_seq, cfg.dim, cfg.heads, cfg.blocks, cfg.dropout)
    if kind == "sasrec":
        return SASRec(seq)
    if kind == "lite":
        return LiteLLM4Rec(torch.from_numpy(item_vectors), seq)
    raise ConfigError(f"lite.models: unknown next-item model {kind!r}; expected sasrec or lite")


def fit_next_item(
    model: NextItemModel, windows: Windows, valid: Queries, train: TrainConfig, k: int = 10
) -> TrainHistory:
    """Cross-entropy over all items at every real position of the training windows; early stopping on the
    valid queries' NDCG@k (full ranking)."""
    device = next(model.parameters()).device
    inputs = torch.from_numpy(windows.inputs).to(device)  # (W, S)
    targets = torch.from_numpy(windows.targets).to(device)  # (W, S)

    def loss(b: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(b).to(device)
        logits = model.scores(model(inputs[t]))  # (B, S, I + 1)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets[t].flatten(), ignore_index=0)

    def score() -> float:
        ranks = rank_queries(
            model.next_item_scores, valid.history, valid.target, valid.seen, device=str(device)
        )
        return float(ndcg_at(ranks, k).mean())

    def report(epoch: int, train_loss: float, ndcg: float) -> None:
        log.info("epoch %d: train loss %.4f, valid NDCG@%d %.4f", epoch, train_loss, k, ndcg)

    return train_early_stopping(model, np.arange(len(inputs)), loss, score, train, on_epoch=report)


def train_config(cfg: LiteConf, seed: int) -> TrainConfig:
    return TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, seed)


def differences(results: list[ModelResult], queries: Queries, k: int) -> dict[str, dict[str, Any]]:
    """Paired differences with user-resampled intervals: lite - sasrec, each sequence model - popularity."""
    by = {r.name: r.ranks for r in results if r.ranks is not None}
    masks = {"all": np.ones(len(queries), bool), "warm": queries.warm, "cold": ~queries.warm}
    out: dict[str, dict[str, Any]] = {}
    for a, b in (("lite", "sasrec"), ("lite", "popularity"), ("sasrec", "popularity")):
        if a in by and b in by:
            ra, rb = by[a], by[b]
            out[f"{a} - {b}"] = {p: paired_difference(ra[:, m], rb[:, m], k, queries.user[m])
                                 for p, m in masks.items()}  # fmt: skip
    return out


def part_reports(ranks: np.ndarray, queries: Queries, k: int) -> dict[str, RankReport]:
    """ranks (S, Q) -> report on all, warm and cold queries."""
    masks = {"all": np.ones(len(queries), bool), "warm": queries.warm, "cold": ~queries.warm}
    return {part: rank_report(ranks[:, m], k, queries.user[m]) for part, m in masks.items()}


def evaluate_model(kind: str, data: LiteData, cfg: LiteConf) -> tuple[ModelResult, list[NextItemModel]]:
    """Fit one model per seed (popularity: none) and rank the test queries; returns the fitted models."""
    if kind == "popularity":
        test = data.test
        ranks = rank_queries(popularity_scorer(data.log.train_counts()), test.history, test.target, test.seen)
        return ModelResult(kind, part_reports(ranks[None], data.test, cfg.k), ranks=ranks[None]), []
    all_ranks, result = [], ModelResult(kind, {})
    models: list[NextItemModel] = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        model = build_model(kind, cfg, data.log.n_items, data.item_vectors).to(DEVICE)
        hist = fit_next_item(model, data.windows, data.valid, train_config(cfg, seed), cfg.k)
        result.best_epochs.append(hist.best_epoch)
        result.valid_ndcg.append(hist.best_score)
        all_ranks.append(
            rank_queries(
                model.next_item_scores, data.test.history, data.test.target, data.test.seen, device=DEVICE
            )  # fmt: skip
        )
        models.append(model.cpu())
        log.info("%s seed %d: best epoch %d, valid NDCG@%d %.4f", kind, seed, hist.best_epoch, cfg.k,
                 hist.best_score)  # fmt: skip
    result.ranks = np.stack(all_ranks)
    result.reports = part_reports(result.ranks, data.test, cfg.k)
    return result, models


# ---------------------------------------------------------------------------------------------- MLflow


def log_result(result: ModelResult, data: LiteData, cfg: LiteConf, model: nn.Module | None) -> str:
    """One MLflow run per model: params, item-vector lineage tags, metrics with interval bounds, weights."""
    import mlflow

    nested = mlflow.active_run() is not None  # under `mlflow run`: one child run per model
    with mlflow.start_run(run_name=f"next-item-{result.name}", nested=nested) as run:
        mlflow.log_params({f"lite.{k}": v for k, v in cfg.model_dump().items()} | {"model": result.name})
        mlflow.set_tags({f"lineage.{k}": str(v) for k, v in data.lineage.items()} | {"task": "next-item"})
        for part, rep in result.reports.items():
            for name, iv in (("recall", rep.recall), ("ndcg", rep.ndcg)):
                key = f"{name}_at_{cfg.k}_{part}"
                mlflow.log_metrics({key: iv.mean, f"{key}_low": iv.low, f"{key}_high": iv.high})
            mlflow.log_metrics({f"n_queries_{part}": rep.n, f"n_users_{part}": rep.users})
        for i, (epoch, score) in enumerate(zip(result.best_epochs, result.valid_ndcg, strict=True)):
            mlflow.log_metrics({"best_epoch": epoch, f"valid_ndcg_at_{cfg.k}": score}, step=i)
        if model is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{result.name}.pt"
                torch.save(model.state_dict(), path)
                mlflow.log_artifact(str(path), artifact_path="model")
        return str(run.info.run_id)


def best_model(result: ModelResult, models: list[NextItemModel]) -> NextItemModel | None:
    return models[int(np.argmax(result.valid_ndcg))] if models else None


# ---------------------------------------------------------------------------------------------- the job


Fit = tuple[ModelResult, "NextItemModel | None"]  # a model's test result and its best-seed model


def fit_all(data: LiteData, cfg: Any) -> list[Fit]:
    """Every model in cfg.models: fitted per seed, ranked on test; cfg is a LiteConf or any object with its
    fields (the GPU path below builds one from JSON)."""
    fits: list[Fit] = []
    for kind in cfg.models:
        result, models = evaluate_model(kind, data, cfg)
        fits.append((result, best_model(result, models)))
    return fits


def run(
    spark: SparkSession | None,
    settings: Settings,
    data: LiteData | None = None,
    fits: list[Fit] | None = None,
) -> LiteSummary:
    """Fit (unless `fits` come from elsewhere), log one MLflow run per model, publish the candidates."""
    import mlflow

    from llmfeat.registry import use_tracking

    cfg = settings.lite
    data = data or load_lite_data(settings)
    log.info("next-item data: %d items, %d training windows, %d valid / %d test queries on %s",
             data.log.n_items, len(data.windows.inputs), len(data.valid), len(data.test), DEVICE)  # fmt: skip
    fits = fits if fits is not None else fit_all(data, cfg)
    use_tracking(settings, cfg.experiment)
    summary = LiteSummary([], cfg.k, len(data.test), data.test.skipped_empty, data.lineage)
    with project_run():
        for result, chosen in fits:
            result.run_id = log_result(result, data, cfg, chosen)
            summary.results.append(result)
            if result.name == "lite" and cfg.publish_k > 0 and chosen is not None:
                from llmfeat.validation.data_docs import link_to_mlflow

                summary.published, checked = publish_candidates(settings, data, chosen, result.run_id)
                link_to_mlflow(mlflow.MlflowClient(), result.run_id, checked)
    summary.differences = differences(summary.results, data.test, cfg.k)
    return summary


def project_run() -> Any:
    """The run `mlflow run` opened (MLFLOW_RUN_ID), as the parent of the per-model runs; else nothing."""
    import contextlib
    import os

    import mlflow

    return mlflow.start_run() if os.environ.get("MLFLOW_RUN_ID") else contextlib.nullcontext()


def publish_candidates(
    settings: Settings, data: LiteData, model: NextItemModel, run_id: str
) -> tuple[str, GateReport]:
    """Gate, then MERGE the top-`lite.publish_k` candidates into the Delta table; returns a one-line report
    and the gate's report (for the training run's Data Docs link)."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import candidates_suite

    cfg = settings.lite
    from llmfeat.models.lite_llm4rec.candidates import candidates_table

    table = candidates_table(data, model, cfg.publish_k, run_id)
    tables = RustDelta(settings.delta_root)
    suite = candidates_suite(cfg.candidates_table, cfg.publish_k, settings.validation)
    checked = gate(
        table, suite, table=cfg.candidates_table, tables=tables, run_id=new_run_id("train-lite"),
        conf=settings.validation,
    )  # fmt: skip
    version = tables.upsert(cfg.candidates_table, table, ["user_id"])
    line = (
        f"published top-{cfg.publish_k} candidates of {table.num_rows:,} users to "
        f"{tables.path(cfg.candidates_table)} (version {version})"
    )
    return line, checked


def main(argv: list[str] | None = None) -> int:
    """`spark-submit spark_jobs/train_lite.py --config ...` (no Spark needed: delta-rs reads the lake), or
    `python -m llmfeat.spark_jobs.train_lite fit DATA.pkl CFG.json OUT.pt` (see `fit_elsewhere`)."""
    import argparse

    from llmfeat.runner import config_args, run_in_process

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fit"]:
        fit_elsewhere(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="train-lite")
    config_args(parser)
    args = parser.parse_args(argv)
    return run_in_process(
        "train-lite", args.config, args.overrides, lambda s: print(run(None, s), flush=True)
    )


def fit_elsewhere(argv: list[str]) -> None:
    """`python -m llmfeat.spark_jobs.train_lite fit DATA.pkl CFG.json OUT.pt`: fit on a machine with a GPU
    but without the lake or MLflow (DATA: a pickled LiteData, CFG: the lite section as JSON);
    `run(None, settings, data, fits)` with the loaded fits then logs and publishes here."""
    import json
    import pickle
    from types import SimpleNamespace

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = pickle.loads(Path(argv[0]).read_bytes())
    cfg = SimpleNamespace(**json.loads(Path(argv[1]).read_text()))
    fits = [(r, m.cpu() if m is not None else None) for r, m in fit_all(data, cfg)]
    torch.save(fits, argv[2])


if __name__ == "__main__":
    # The package's copy, so the saved results unpickle as llmfeat.spark_jobs.train_lite classes, not as
    # __main__ ones, and the CLI's error classes are caught.
    from llmfeat.spark_jobs.train_lite import main as package_main

    sys.exit(package_main())
