"""Training loop for MARC: fit rows from one split, early stopping on the valid split's AUC.

Notation: U users, I items, D tapped-layer width, N rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.evaluation.metrics import auc
from llmfeat.models.marc.model import ENTITIES, Marc, MarcCompressor, MarcConfig
from llmfeat.models.trainer import TrainConfig, TrainHistory, train_early_stopping

log = logging.getLogger(__name__)


def marc_periods(
    timestamps: np.ndarray, split: np.ndarray, fit_frac: float, stop_frac: float
) -> dict[str, np.ndarray]:
    """Row masks by time within the train split: MARC fits on its first `fit_frac`, stops early on the next
    `stop_frac`; what comes after (`after`, any split) is where a CTR model may learn from MARC's vectors,
    so that it never fits on rows whose labels the compressor was fitted to."""
    train = split == "train"
    fit_end, stop_end = np.quantile(timestamps[train], [fit_frac, min(fit_frac + stop_frac, 1.0)])
    return {
        "marc_fit": train & (timestamps < fit_end),
        "marc_stop": train & (timestamps >= fit_end) & (timestamps < stop_end),
        "after": timestamps >= stop_end,
    }


@dataclass
class MarcFit:
    model: Marc
    history: TrainHistory

    def compressor(self, entity: str) -> MarcCompressor:
        return self.model.compressor(entity)


def fit_marc(
    a: CtrArrays,
    x_users: np.ndarray,
    x_items: np.ndarray,
    cfg: MarcConfig,
    train: TrainConfig,
    fit_split: str = "train",
    stop_split: str = "valid",
    max_fit_rows: int = 0,
    fit_rows: np.ndarray | None = None,
    stop_rows: np.ndarray | None = None,
) -> MarcFit:
    """x_users (U, D), x_items (I, D) float32 states of one layer; returns the fitted model and its curves.
    Rows: `fit_rows` / `stop_rows` (indices) when given, else the splits named."""
    torch.manual_seed(train.seed)
    model = Marc(cfg)
    xu, xi = torch.from_numpy(x_users.astype(np.float32)), torch.from_numpy(x_items.astype(np.float32))
    fit_rows = a.rows(fit_split) if fit_rows is None else fit_rows
    stop_rows = a.rows(stop_split) if stop_rows is None else stop_rows
    if 0 < max_fit_rows < len(fit_rows):  # a documented sample, e.g. for the demo
        fit_rows = np.sort(np.random.default_rng(train.seed).choice(fit_rows, max_fit_rows, replace=False))
    # standardise with the entities that the fit rows touch
    for entity, x, idx in (("users", xu, a.user_idx), ("items", xi, a.item_idx)):
        seen = torch.from_numpy(np.unique(idx[fit_rows]))
        model.compressor(entity).fit_standardiser(x[seen])
    u, i, y = torch.from_numpy(a.user_idx), torch.from_numpy(a.item_idx), torch.from_numpy(a.label)

    def loss(b: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        t = torch.from_numpy(b)
        parts = model.loss(xu[u[t]], xi[i[t]], y[t])
        return parts.total, {
            "bce": float(parts.bce.detach()),
            "hsic_keep": float(parts.keep.detach()),
            "hsic_indep": float(parts.indep.detach()),
        }

    t_stop = torch.from_numpy(stop_rows)

    def score() -> float:
        return auc(a.label[stop_rows], model(xu[u[t_stop]], xi[i[t_stop]]).numpy())

    def report(epoch: int, train_loss: float, valid_auc: float) -> None:
        log.info("marc epoch %d: train loss %.4f, valid AUC %.4f", epoch, train_loss, valid_auc)

    history = train_early_stopping(model, fit_rows, loss, score, train, on_epoch=report)
    return MarcFit(model, history)


@torch.no_grad()
def compress(compressor: MarcCompressor, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(N, D) -> (N, d) float32 with the compressor in eval mode."""
    compressor.eval()
    out = [compressor(torch.from_numpy(x[s : s + batch].astype(np.float32))) for s in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


__all__ = ["ENTITIES", "MarcFit", "compress", "fit_marc"]
