"""Fitting a CTR ranker on a scoring frame: the id model first, then the LLM residual branch on top of it.

Notation: N rows of the frame, B a batch of row indices. The frame is the training set
(spark_jobs/training_set.py); `masks` are its fit / valid / test / train row masks (N,) (`split_masks`).
The job that tracks and registers the model: spark_jobs/train_ctr.py; this module is torch, numpy and pandas
only, and reports per-epoch metrics through `log_metrics` (e.g. `mlflow.log_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

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
    return CtrConfig(
        n_users=len(encoder.user_ids) + 1,
        n_items=len(encoder.item_ids) + 1,
        n_genres=len(encoder.genres),
        n_dense=len(encoder.dense_names),
        user_vec_dim=encoder.vec_dim("user_vector"),
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


def fit_model(
    frame: pd.DataFrame,
    masks: dict[str, np.ndarray],
    use_llm: bool,
    cfg: CtrConf,
    log_metrics: MetricLogger | None = None,
    residual_rows: np.ndarray | None = None,
    id_state: dict[str, torch.Tensor] | None = None,
) -> tuple[CtrModel, FeatureEncoder]:
    """Fit the encoder on the fit rows, then the id model with early stopping on valid; with LLM vectors,
    then the residual branch on top of the fitted id model (id part frozen), on `residual_rows` (default: the
    fit rows), regularised, keeping the zero branch when no epoch improves the valid AUC. `id_state`: the id
    part of a model fitted on the same frame (an ablation reuses it instead of fitting it again).
    `log_metrics`: receives each epoch's train loss, valid AUC and LogLoss (steps: id epochs, 1000 + residual
    epochs)."""
    y = frame["label"].to_numpy(np.float32)
    encoder = FeatureEncoder.fit(frame, y, masks["fit"], masks["train"], use_llm)
    # Seeded before the model exists, and the id stage below never runs the branch (its dropout would draw
    # random numbers): with and without LLM fields, the same seed gives the same id part.
    torch.manual_seed(cfg.seed)
    model = CtrModel(model_config(cfg, encoder))
    x, y_t = encoder.transform(frame), torch.from_numpy(y)
    valid = np.flatnonzero(masks["valid"])
    x_valid = _rows(x, valid)

    forward: Any = model.id_logit  # the id stage; then the whole model

    def loss(batch: np.ndarray) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(forward(_rows(x, batch)), y_t[batch])

    def score() -> float:
        p = torch.sigmoid(forward(x_valid)).numpy()
        score.logloss = logloss(y[valid], p)  # type: ignore[attr-defined]
        return auc(y[valid], p)

    def on_epoch(stage: str) -> Any:
        offset = 0 if stage == "id" else 1000

        def log_epoch(epoch: int, train_loss: float, valid_auc: float) -> None:
            log.info("%s epoch %d: train loss %.4f, valid AUC %.4f", stage, epoch, train_loss, valid_auc)
            if log_metrics is not None:
                metrics = {f"{stage}_train_loss": train_loss, f"{stage}_valid_auc": valid_auc}
                log_metrics(metrics | {f"{stage}_valid_logloss": score.logloss}, offset + epoch)  # type: ignore[attr-defined]

        return log_epoch

    id_train = TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed)
    fit = np.flatnonzero(masks["fit"])
    # The id part first: the same model, rows and seed as the model without LLM features.
    if id_state is None:
        train_early_stopping(model, fit, loss, score, id_train, on_epoch("id"), params=model.id_parameters())
    else:
        model.load_state_dict(id_state, strict=False)
    if model.residual is not None:
        forward = model
        for p in model.id_parameters():
            p.requires_grad_(False)
        rows = fit if residual_rows is None else np.intersect1d(fit, residual_rows)
        res_train = TrainConfig(
            cfg.residual_lr, cfg.residual_weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed
        )
        params = list(model.residual.parameters())
        train_early_stopping(
            model, rows, loss, score, res_train, on_epoch("residual"), params, keep_start=True
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
