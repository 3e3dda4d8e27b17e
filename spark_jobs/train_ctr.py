"""Train a CTR ranker from a Feast training set, track it in MLflow and register it under an alias.

    llmfeat train-ctr [--llm | --no-llm] [--alias challenger] [--set ctr.kind=dnn] [--set ctr.epochs=4]
    mlflow run mlflow -e train -P llm=true -P alias=challenger

One MLflow run per model: params (model and trainer config), per-epoch train loss and valid AUC / LogLoss,
final AUC / GAUC / LogLoss with 95% bootstrap intervals on valid and test (test also for warm and cold users),
ROC and calibration plots, lineage tags (feature service and views, Delta versions, encoder, layer,
compressor version, snapshot time). The model is registered as a pyfunc (models/ctr/pyfunc.py) with
signature, input example and pip requirements; its version carries the same lineage tags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from llmfeat.feast_repo import marc_views_in
from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrConfig, CtrInputs, CtrModel
from llmfeat.models.evaluation.ctr_eval import calibration_figure, flat_metrics, metric_intervals, roc_figure
from llmfeat.models.evaluation.metrics import Interval, auc, logloss
from llmfeat.models.trainer import TrainConfig, train_early_stopping
from llmfeat.spark_jobs.ctr_dataset import (
    Snapshot,
    build_frame,
    check_training_set,
    describe,
    service_names,
    split_masks,
)

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import CtrConf, Settings
    from llmfeat.delta_io import DeltaTables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedCtr:
    name: str  # registered model name
    version: str
    run_id: str
    uses_llm: bool
    alias: str | None
    test: dict[str, Interval]

    def summary(self) -> str:
        kind = "with LLM features" if self.uses_llm else "without LLM features"
        alias = f" @{self.alias}" if self.alias else ""
        metrics = "  ".join(f"{k.upper()} {v}" for k, v in self.test.items())
        return f"{self.name} v{self.version}{alias} ({kind}) test: {metrics}"


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
    log_epochs: bool = True,
    residual_rows: np.ndarray | None = None,
    id_state: dict[str, torch.Tensor] | None = None,
) -> tuple[CtrModel, FeatureEncoder]:
    """Fit the encoder on the fit rows, then the id model with early stopping on valid; with LLM vectors,
    then the residual branch on top of the fitted id model (id part frozen), on `residual_rows` (default: the
    fit rows), regularised, keeping the zero branch when no epoch improves the valid AUC. `id_state`: the id
    part of a model fitted on the same frame (an ablation reuses it instead of fitting it again)."""
    import mlflow

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
            if log_epochs:
                metrics = {f"{stage}_train_loss": train_loss, f"{stage}_valid_auc": valid_auc}
                mlflow.log_metrics(metrics | {f"{stage}_valid_logloss": score.logloss}, step=offset + epoch)  # type: ignore[attr-defined]

        return log_epoch

    id_train = TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.patience, cfg.seed)
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
            cfg.residual_lr, cfg.residual_weight_decay, cfg.batch_size, cfg.epochs, cfg.patience, cfg.seed
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
        "ctr.uses_llm": str(use_llm).lower(),
        "feast.feature_service": service,
    }


def train_and_register(
    settings: Settings, tables: DeltaTables, store: FeatureStore, use_llm: bool, alias: str | None = None
) -> TrainedCtr:
    """Build the training set from Feast, train, evaluate, log and register (and set `alias`)."""
    import mlflow

    from llmfeat.models.ctr.pyfunc import log_ranker
    from llmfeat.validation.data_docs import link_inputs, link_to_mlflow, locations

    cfg = settings.ctr
    frame, snapshot = build_frame(settings, tables, store, service_names(settings, use_llm))
    label = f"{cfg.kind}-{'llm' if use_llm else 'id'}"
    checked = check_training_set(settings, tables, frame, snapshot, f"training_set_{label.replace('-', '_')}")
    masks = split_masks(frame, cfg.stop_frac)
    use_ctr_tracking(settings)
    tags = run_tags(snapshot, cfg, use_llm)
    with mlflow.start_run(run_name=f"train-{label}", tags=tags) as run:
        link_to_mlflow(mlflow.MlflowClient(), run.info.run_id, checked)
        marc_tables = [m.feast_table for m in marc_views_in(snapshot.views)]
        inputs = ["interactions", *marc_tables, "feast_item_meta"]
        link_inputs(mlflow.MlflowClient(), run.info.run_id, locations(settings)[0].parent, inputs)
        mlflow.log_params({f"ctr.{k}": v for k, v in cfg.model_dump().items()} | describe(frame))
        model, encoder = fit_model(frame, masks, use_llm, cfg, residual_rows=after_marc(settings, frame))
        p = predict(model, encoder, frame)
        warm = frame["user_id"].isin(set(frame.loc[masks["train"], "user_id"])).to_numpy()
        results = evaluate(frame, p, masks, warm, cfg.n_boot)
        for subset, intervals in results.items():
            mlflow.log_metrics(flat_metrics(subset, intervals))
        log_plots(frame, p, masks["test"], label)
        example = frame[masks["test"]].dropna(subset=[c for c in ("user_vector",) if use_llm]).head(5)
        info = log_ranker(model, encoder, example, cfg.registry_name)
        version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registry_name, version, key, value)
    client.set_model_version_tag(cfg.registry_name, version, "train_run_id", run.info.run_id)
    if alias:
        client.set_registered_model_alias(cfg.registry_name, alias, version)
    return TrainedCtr(cfg.registry_name, version, run.info.run_id, use_llm, alias, results["test"])


def after_marc(settings: Settings, frame: pd.DataFrame) -> np.ndarray:
    """Rows after the period MARC was fitted and early-stopped on (marc.fit_frac, marc.stop_frac): the only
    rows the LLM branch learns from, so it never fits labels the compressor was fitted to."""
    from llmfeat.models.marc.train import marc_periods

    ts = pd.to_datetime(frame["event_timestamp"], utc=True).astype("int64").to_numpy()
    after = marc_periods(ts, frame["split"].to_numpy(), settings.marc.fit_frac, settings.marc.stop_frac)[
        "after"
    ]
    return np.flatnonzero(after)


def use_ctr_tracking(settings: Settings) -> str:
    """The configured tracking store (llmfeat/registry.py) with the CTR experiment; returns its id."""
    from llmfeat.registry import use_tracking

    mlflow_conf = settings.mlflow.model_copy(update={"experiment": settings.ctr.experiment})
    return use_tracking(settings.model_copy(update={"mlflow": mlflow_conf}))
