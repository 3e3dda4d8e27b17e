"""Fitting a CTR ranker on a scoring frame: the id model first, then the LLM residual branch on top of it.

Notation: N rows of the frame, B a batch of row indices. The frame is the training set
(spark_jobs/training_set.py); `masks` are its fit / valid / test / train row masks (N,) (`split_masks`).
The job that tracks and registers the model: spark_jobs/train_ctr.py; this module is torch, numpy and pandas
only, and reports per-epoch metrics through `log_metrics` (e.g. `mlflow.log_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from llmfeat.errors import UserError
from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrConfig, CtrInputs, CtrModel
from llmfeat.models.evaluation.metrics import auc, logloss
from llmfeat.models.marc.train import marc_periods
from llmfeat.models.trainer import TrainConfig, train_early_stopping

if TYPE_CHECKING:
    from llmfeat.config import CtrConf, MarcConf

log = logging.getLogger(__name__)

# metrics of one epoch, step -> anything (mlflow.log_metrics fits)
MetricLogger = Callable[[dict[str, float], int], object]


def model_config(cfg: CtrConf, encoder: FeatureEncoder) -> CtrConfig:
    if cfg.kind == "lightgbm":
        raise UserError("ctr.kind=lightgbm is the tree family (models/ctr/tree.py), not a DNN")
    return CtrConfig(
        n_users=len(encoder.user_ids) + 1,
        n_items=len(encoder.item_ids) + 1,
        n_genres=len(encoder.genres),
        n_dense=len(encoder.dense_names),
        user_vec_dim=encoder.user_dim,
        item_vec_dim=encoder.vec_dim("item_vector"),
        kind=cfg.kind,
        emb_dim=cfg.emb_dim,
        hidden=tuple(cfg.hidden),
        dropout=cfg.dropout,
        residual_width=cfg.residual_width,
    )


def _rows(x: CtrInputs, idx: np.ndarray) -> CtrInputs:
    t = torch.from_numpy(idx)
    return CtrInputs(*(part[t] for part in x))


def cold_rates(x: CtrInputs, rows: np.ndarray) -> tuple[float, float]:
    """Shares of `rows` whose user / item is index 0 (not in the encoder's fit vocabulary)."""
    if not len(rows):
        return 0.0, 0.0
    t = torch.from_numpy(rows)
    return float((x.user[t] == 0).double().mean()), float((x.item[t] == 0).double().mean())


def drop_ids(x: CtrInputs, rates: tuple[float, float], rng: np.random.Generator) -> CtrInputs:
    """Each row's user (item) id -> index 0 with probability rates[0] (rates[1]): a batch as cold as the
    rows the model scores, where the id part knows nothing of most users."""
    n = len(x.user)
    cold_user = torch.from_numpy(rng.random(n) < rates[0])
    cold_item = torch.from_numpy(rng.random(n) < rates[1])
    return x._replace(user=x.user.masked_fill(cold_user, 0), item=x.item.masked_fill(cold_item, 0))


def score_valid(
    metrics: dict[str, float], y: np.ndarray, p: np.ndarray, folds: list[np.ndarray]
) -> dict[str, float]:
    """The valid metrics of scores p (N,) for labels y (N,), into `metrics`: AUC, LogLoss and the LogLoss
    averaged over the time folds (positions in y)."""
    metrics["valid_auc"], metrics["valid_logloss"] = auc(y, p), logloss(y, p)
    metrics["valid_fold_logloss"] = float(np.mean([logloss(y[f], p[f]) for f in folds]))
    return metrics


def epoch_logger(
    stage: str, metrics: dict[str, float], log_metrics: MetricLogger | None
) -> Callable[[int, float, float], None]:
    """An epoch's log line and metrics (steps: id epochs, 1000 + residual epochs), reading the latest valid
    metrics from `metrics`."""
    offset = 0 if stage == "id" else 1000

    def log_epoch(epoch: int, train_loss: float, _score: float) -> None:
        log.info(
            "%s epoch %d: train loss %.4f, valid AUC %.4f, LogLoss %.4f (time folds %.4f)",
            stage, epoch, train_loss, metrics["valid_auc"], metrics["valid_logloss"],
            metrics["valid_fold_logloss"],
        )  # fmt: skip
        if log_metrics is not None:
            named = {f"{stage}_{k}": v for k, v in metrics.items()}
            log_metrics(named | {f"{stage}_train_loss": train_loss}, offset + epoch)

    return log_epoch


def branch_id_dropout(
    cfg: CtrConf, valid_cold: tuple[float, float], log_metrics: MetricLogger | None
) -> tuple[float, float]:
    """The (user, item) id dropout of the LLM branch: the valid rows' cold rates or ctr.id_dropout; logged
    at step 999."""
    rates = valid_cold if cfg.id_dropout == "valid_rate" else (cfg.id_dropout, cfg.id_dropout)
    log.info("residual id dropout: users %.3f, items %.3f", *rates)
    if log_metrics is not None:
        log_metrics({"residual_user_id_dropout": rates[0], "residual_item_id_dropout": rates[1]}, 999)
    return rates


def time_folds(frame: pd.DataFrame, rows: np.ndarray, k: int) -> list[np.ndarray]:
    """Positions in `rows` cut into `k` folds of equal time span (by event_timestamp; row order without it),
    empty folds left out: each span weighs the same, however many rows a burst puts in one."""
    if "event_timestamp" in frame.columns:
        t = pd.to_datetime(frame["event_timestamp"].iloc[rows], utc=True).astype("int64").to_numpy()
    else:
        t = np.arange(len(rows))
    if not len(t):
        return []
    edges = np.linspace(t.min(), t.max(), k + 1)[1:-1]
    fold = np.searchsorted(edges, t, side="right")  # (len(rows),) in 0..k-1
    return [f for f in (np.flatnonzero(fold == j) for j in range(k)) if len(f)]


def fit_model(
    frame: pd.DataFrame,
    masks: dict[str, np.ndarray],
    use_llm: bool,
    cfg: CtrConf,
    log_metrics: MetricLogger | None = None,
    residual_rows: np.ndarray | None = None,
    id_state: dict[str, torch.Tensor] | None = None,
) -> tuple[CtrModel, FeatureEncoder]:
    """Fit the encoder on the fit rows, then the id model with early stopping on valid AUC; with LLM vectors,
    then the residual branch on top of the fitted id model (id part frozen and in eval mode), on
    `residual_rows` (default: the fit rows), with ids dropped to index 0 at `cfg.id_dropout`, regularised,
    selected by valid LogLoss averaged over `cfg.residual_folds` time folds with the zero branch a candidate.
    `id_state`: the id part of a model fitted on the same frame (an ablation reuses it instead of fitting it
    again). `log_metrics`: receives each epoch's train loss, valid AUC, LogLoss and fold LogLoss (steps: id
    epochs, 1000 + residual epochs) and the branch's id dropout rates (step 999)."""
    y = frame["label"].to_numpy(np.float32)
    encoder = FeatureEncoder.fit(frame, y, masks["fit"], masks["train"], use_llm)
    # Seeded before the model exists, and the id stage below never runs the branch (its dropout would draw
    # random numbers): with and without LLM fields, the same seed gives the same id part.
    torch.manual_seed(cfg.seed)
    model = CtrModel(model_config(cfg, encoder))
    x, y_t = encoder.transform(frame), torch.from_numpy(y)
    valid = np.flatnonzero(masks["valid"])
    x_valid, y_valid = _rows(x, valid), y[valid]
    folds = time_folds(frame, valid, cfg.residual_folds)
    metrics: dict[str, float] = {}  # the latest valid metrics, for the epoch log

    def valid_metrics(forward: Callable[[CtrInputs], torch.Tensor]) -> dict[str, float]:
        p = torch.sigmoid(forward(x_valid)).numpy()
        return score_valid(metrics, y_valid, p, folds)

    def bce(logit: torch.Tensor, batch: np.ndarray) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logit, y_t[batch])

    def on_epoch(stage: str) -> Callable[[int, float, float], None]:
        return epoch_logger(stage, metrics, log_metrics)

    id_train = TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed)
    fit = np.flatnonzero(masks["fit"])
    # The id part first: the same model, rows, seed and selection (valid AUC) as the model without LLM
    # features.
    if id_state is None:
        train_early_stopping(
            model,
            fit,
            lambda batch: bce(model.id_logit(_rows(x, batch)), batch),
            lambda: valid_metrics(model.id_logit)["valid_auc"],
            id_train,
            on_epoch("id"),
            params=model.id_parameters(),
        )
    else:
        model.load_state_dict(id_state, strict=False)
    if model.residual is not None:
        for p in model.id_parameters():
            p.requires_grad_(False)
        rows = fit if residual_rows is None else np.intersect1d(fit, residual_rows)
        # The fit rows' ids are all known, the scored rows' mostly not: the branch sees ids as cold as valid's
        # (its own random stream, so the trainer's batch order is still the seed's).
        rates = branch_id_dropout(cfg, cold_rates(x, valid), log_metrics)
        drop_rng = np.random.default_rng((cfg.seed, 1))
        res_train = TrainConfig(
            cfg.residual_lr, cfg.residual_weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed
        )
        # LogLoss, not AUC: the branch also shifts whole groups (cold users, users with history), which AUC
        # over all rows barely sees; averaged over time folds, so that one late burst of rows cannot decide.
        train_early_stopping(
            model,
            rows,
            lambda batch: bce(model(drop_ids(_rows(x, batch), rates, drop_rng)), batch),
            lambda: -valid_metrics(model)["valid_fold_logloss"],
            res_train,
            on_epoch("residual"),
            list(model.residual.parameters()),
            keep_start=True,
            train_module=model.residual,  # the frozen id part keeps its scoring-time (eval) dropout
        )
        for p in model.id_parameters():
            p.requires_grad_(True)
    return model, encoder


def predict(model: CtrModel, encoder: FeatureEncoder, frame: pd.DataFrame) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(encoder.transform(frame))).numpy().astype(np.float64)


def after_marc(frame: pd.DataFrame, marc: MarcConf) -> np.ndarray:
    """Rows after the period MARC was fitted and early-stopped on (marc.fit_frac, marc.stop_frac): the only
    rows the LLM branch learns from, so it never fits labels the compressor was fitted to."""
    ts = pd.to_datetime(frame["event_timestamp"], utc=True).astype("int64").to_numpy()
    after = marc_periods(ts, frame["split"].to_numpy(), marc.fit_frac, marc.stop_frac)["after"]
    return np.flatnonzero(after)
