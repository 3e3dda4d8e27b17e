"""Training BAHE end to end: the deep part, the compressor and the CTR head on the train split's rows.

Notation: U users, N rows, D behaviour width, d user-vector width.

Mini-batches are users, not rows: one causal pass over a user's behaviour sequence serves all of that user's
train rows (each row takes the prefix strictly before its time). Early stopping on the valid split's AUC,
where every row uses the user vector at the cut: the vector that is published. The shared loop is
models/trainer.py."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmfeat.models.bahe.data import BehaviorSequences, length_batches, padded_batch
from llmfeat.models.bahe.model import Bahe
from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.evaluation.metrics import auc
from llmfeat.models.marc.model import MarcCompressor
from llmfeat.models.trainer import TrainConfig, TrainHistory, train_early_stopping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaheTrainConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-5
    users_per_batch: int = 64
    max_epochs: int = 8
    patience: int = 2
    seed: int = 0
    position_budget: int = 8192  # behaviour positions per inference batch
    fit_split: str = "train"
    stop_split: str = "valid"


@dataclass
class BaheFit:
    model: Bahe
    history: TrainHistory
    seconds: float
    rows: int  # train rows per epoch
    positions: int  # behaviour positions per epoch (the deep part's "tokens")


@torch.no_grad()
def user_states(model: Bahe, seqs: BehaviorSequences, users: np.ndarray, budget: int = 8192) -> torch.Tensor:
    """Pooled state at the cut per user (len(users), D); the fallback state for users with no behaviour."""
    out = model.fallback.detach().expand(len(users), -1).clone()  # (U', D)
    pos = {int(u): i for i, u in enumerate(users)}
    lengths = seqs.lengths
    with_history = users[lengths[users] > 0]
    for batch in length_batches(lengths, with_history, budget):
        x, mask = padded_batch(seqs, batch)
        prefixes = model.prefix_states(torch.from_numpy(x), torch.from_numpy(mask))  # (B, T, D)
        last = torch.from_numpy(lengths[batch] - 1)
        out[[pos[int(u)] for u in batch]] = prefixes[torch.arange(len(batch)), last]
    return out


@torch.no_grad()
def user_vectors(model: Bahe, seqs: BehaviorSequences, budget: int = 8192) -> np.ndarray:
    """(U, d) float32 published user vectors at the cut, in user order; eval mode."""
    model.eval()
    users = np.arange(len(seqs.lengths))
    return model.user_vector(user_states(model, seqs, users, budget)).numpy().astype(np.float32)


def rows_by_user(a: CtrArrays, rows: np.ndarray) -> dict[int, np.ndarray]:
    order = rows[np.argsort(a.user_idx[rows], kind="stable")]
    users, starts = np.unique(a.user_idx[order], return_index=True)
    return {int(u): r for u, r in zip(users, np.split(order, starts[1:]), strict=True)}


def fit_bahe(model: Bahe, seqs: BehaviorSequences, a: CtrArrays, cfg: BaheTrainConfig) -> BaheFit:
    """Train in place; the best state (valid AUC) is restored. The compressor's standardiser is fitted first,
    on the initial states of the users that have fit rows."""
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    prefix = seqs.prefix_lengths(a)  # (N,)
    fit_rows = a.rows(cfg.fit_split)
    by_user = rows_by_user(a, fit_rows)
    fit_users = np.array(sorted(by_user), dtype=np.int64)
    if isinstance(model.compressor, MarcCompressor):
        model.eval()
        model.compressor.fit_standardiser(user_states(model, seqs, fit_users, cfg.position_budget))
    label, item = torch.from_numpy(a.label), torch.from_numpy(a.item_idx)
    bce = nn.functional.binary_cross_entropy_with_logits

    def rows_loss(users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, mask = padded_batch(seqs, users)  # (B, T, D), (B, T)
        rows = np.concatenate([by_user[int(u)] for u in users])  # (R,)
        row_user = np.concatenate([np.full(len(by_user[int(u)]), b) for b, u in enumerate(users)])
        r = torch.from_numpy(rows)
        prefixes = model.prefix_states(torch.from_numpy(x), torch.from_numpy(mask))  # (B, T, D)
        state = model.pick(prefixes, torch.from_numpy(row_user), torch.from_numpy(prefix[rows]))  # (R, D)
        logit = model.head(model.user_vector(state), item[r])  # (R,)
        return bce(logit, label[r], reduction="sum"), state, len(rows)

    def loss(users: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        # users of similar length share a forward pass, so little of it is padding
        parts = [rows_loss(b) for b in length_batches(seqs.lengths, users, cfg.position_budget)]
        n = sum(p[2] for p in parts)
        task = sum((p[0] for p in parts), torch.zeros(())) / n
        states = torch.cat([p[1] for p in parts])
        keep = model.keep_term(states[torch.randperm(len(states))])
        return task - model.cfg.keep_weight * keep, {
            "bce": float(task.detach()),
            "hsic_keep": float(keep.detach()),
        }

    stop = a.rows(cfg.stop_split)
    t_stop = torch.from_numpy(stop)

    def score() -> float:
        vectors = model.user_vector(
            user_states(model, seqs, np.arange(len(seqs.lengths)), cfg.position_budget)
        )
        logits = model.head(vectors[torch.from_numpy(a.user_idx[stop])], item[t_stop])
        return auc(a.label[stop], logits.numpy())

    def report(epoch: int, train_loss: float, valid_auc: float) -> None:
        log.info("bahe epoch %d: train loss %.4f, valid AUC %.4f (%.0f s)", epoch, train_loss, valid_auc,
                 time.monotonic() - started)  # fmt: skip

    train = TrainConfig(cfg.lr, cfg.weight_decay, cfg.users_per_batch, cfg.max_epochs, cfg.patience, cfg.seed)
    history = train_early_stopping(model, fit_users, loss, score, train, on_epoch=report)
    positions = int(seqs.lengths[fit_users].sum())
    return BaheFit(model, history, time.monotonic() - started, len(fit_rows), positions)


def log_bahe(
    fit: BaheFit,
    params: dict[str, object],
    lineage: dict[str, object],
    seqs: BehaviorSequences,
    sample_users: int = 0,
) -> None:
    """Inside an active MLflow run: config, lineage of the behaviour table, curves, input report, weights."""
    import json
    import tempfile
    from pathlib import Path

    import mlflow

    mlflow.set_tags({"kind": "bahe-user-encoder", "model_config": json.dumps(fit.model.cfg.__dict__)})
    mlflow.log_params({f"bahe.{k}": v for k, v in params.items()})
    mlflow.log_params({f"behaviors.{k}": v for k, v in lineage.items()} | {"sample_users": sample_users})
    h = fit.history
    for epoch, (loss, score) in enumerate(zip(h.train_loss, h.valid_score, strict=True)):
        mlflow.log_metrics({"train_loss": loss, "valid_auc": score}, step=epoch)
    mlflow.log_metrics(
        {
            "best_valid_auc": h.best_score,
            "best_epoch": h.best_epoch,
            "train_seconds": fit.seconds,
            "train_rows_per_epoch": fit.rows,
            "behaviour_positions_per_epoch": fit.positions,
            "users_no_history": int(seqs.no_history.sum()),
            "missing_behavior_events": seqs.missing.events,
            "missing_behavior_ids": seqs.missing.ids,
            "trainable_parameters": sum(p.numel() for p in fit.model.parameters() if p.requires_grad),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bahe_state_dict.pt"
        torch.save(fit.model.state_dict(), path)
        mlflow.log_artifact(str(path), artifact_path="model")
