"""The evaluation protocol: ID model on the train split, the fixed probe on the valid split, metrics on test.

Notation: N rows, S seeds, U users, I items.

- The ID model is fitted on train rows before the last `id_stop_frac` of train time and early-stopped on the
  rest.
- The probe is fitted on the valid split (rows after the representation cut, so no label leaks through the
  user vector), early-stopped on the rows of a random `probe_stop_frac` of its users (seeded), scored on
  the test split.
- Test metrics: AUC, GAUC, LogLoss on all test rows, warm users (train history) and cold users; each as the
  mean over seeds with a 95% bootstrap interval over test rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.evaluation.ctr_probe import CtrProbe, IdModel, IdModelConfig, ProbeConfig
from llmfeat.models.evaluation.metrics import Interval, auc, bootstrap_interval, gauc, logloss, seed_interval
from llmfeat.models.trainer import TrainConfig, train_early_stopping


@dataclass(frozen=True)
class ProtocolConfig:
    id_stop_frac: float = 0.1
    probe_stop_frac: float = 0.2
    id_train: TrainConfig = TrainConfig(lr=5e-3, weight_decay=0.0, batch_size=1024, max_epochs=60, patience=4)
    probe_train: TrainConfig = TrainConfig(
        lr=2e-3, weight_decay=1e-4, batch_size=256, max_epochs=60, patience=6
    )
    n_boot: int = 300


def _bce(logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logit, y)


def fit_id_model(a: CtrArrays, cfg: ProtocolConfig, seed: int = 0) -> np.ndarray:
    """Fit the ID model on the train split; its logit for every row (N,)."""
    train = a.rows("train")
    cut = np.quantile(a.timestamp[train], 1 - cfg.id_stop_frac)
    fit, stop = train[a.timestamp[train] < cut], train[a.timestamp[train] >= cut]
    model = IdModel(IdModelConfig(len(a.user_keys), len(a.item_keys), a.dense.shape[1]))
    u, i = torch.from_numpy(a.user_idx), torch.from_numpy(a.item_idx)
    x, y = torch.from_numpy(a.dense), torch.from_numpy(a.label)
    t_stop = torch.from_numpy(stop)

    def loss(b: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(b)
        return _bce(model(u[t], i[t], x[t]), y[t]) + 1e-5 * (
            model.user_emb(u[t]).pow(2).sum(-1).mean() + model.item_emb(i[t]).pow(2).sum(-1).mean()
        )

    def score() -> float:
        return auc(a.label[stop], model(u[t_stop], i[t_stop], x[t_stop]).numpy())

    train_early_stopping(model, fit, loss, score, _seeded(cfg.id_train, seed))
    with torch.no_grad():
        return model(u, i, x).numpy()


def _seeded(cfg: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, seed)


def standardise(v: np.ndarray) -> np.ndarray:
    """Per-dimension z-score over entities (unsupervised), so every method reaches the probe on one scale."""
    if v.shape[1] == 0:
        return v.astype(np.float32)
    return ((v - v.mean(0)) / (v.std(0) + 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class ProbeRun:
    test_pred: np.ndarray  # (N_test,) click probabilities
    stop_auc: float  # early-stopping AUC (on valid rows): used to pick layers, never test


def fit_probe(
    a: CtrArrays,
    id_logit: np.ndarray,
    v_users: np.ndarray,
    v_items: np.ndarray,
    cfg: ProtocolConfig,
    seed: int = 0,
) -> ProbeRun:
    """v_users (U, Du), v_items (I, Di); Du or Di may be 0 (the ID-only reference)."""
    valid = a.rows("valid")
    # Early stopping on held-out *users*: test users are mostly unseen (cold), so a row-wise split would
    # reward memorising the valid period's users through their vectors.
    users = np.unique(a.user_idx[valid])
    rng = np.random.default_rng(1000 + seed)
    stop_users = rng.choice(users, int(len(users) * cfg.probe_stop_frac), replace=False)
    held = np.isin(a.user_idx[valid], stop_users)
    stop, fit = valid[held], valid[~held]
    test = a.rows("test")
    vu, vi = torch.from_numpy(standardise(v_users)), torch.from_numpy(standardise(v_items))
    u, i = torch.from_numpy(a.user_idx), torch.from_numpy(a.item_idx)
    x, y, z = (
        torch.from_numpy(a.dense),
        torch.from_numpy(a.label),
        torch.from_numpy(id_logit.astype(np.float32)),
    )
    torch.manual_seed(seed)
    model = CtrProbe(ProbeConfig(vu.shape[1], vi.shape[1], x.shape[1]))

    def logits(rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(rows)
        return model(z[t], x[t], vu[u[t]], vi[i[t]])

    def loss(b: np.ndarray) -> torch.Tensor:
        return _bce(logits(b), y[torch.from_numpy(b)])

    def score() -> float:
        return auc(a.label[stop], logits(stop).numpy())

    hist = train_early_stopping(model, fit, loss, score, _seeded(cfg.probe_train, seed))
    with torch.no_grad():
        pred = torch.sigmoid(logits(test)).numpy()
    return ProbeRun(pred, hist.best_score)


def _seed_mean(
    metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, preds: np.ndarray
) -> Callable[[np.ndarray], float]:
    return lambda idx: float(np.mean([metric(y[idx], p[idx]) for p in preds]))


def split_metrics(a: CtrArrays, preds: np.ndarray, n_boot: int = 300) -> dict[str, Interval]:
    """preds (S, N_test) -> {auc, gauc, logloss} x {all, warm, cold}: means over seeds.

    AUC and LogLoss intervals: bootstrap over test rows; GAUC interval: over seeds.
    """
    test = a.rows("test")
    y, users, warm = a.label[test], a.user_idx[test], a.warm[test]
    out: dict[str, Interval] = {}
    for part, mask in (("all", np.ones(len(test), bool)), ("warm", warm), ("cold", ~warm)):
        yy, pp, gg = y[mask], preds[:, mask], users[mask]
        n = len(yy)
        for name, metric in (("auc", auc), ("logloss", logloss)):
            out[f"{name}_{part}"] = bootstrap_interval(_seed_mean(metric, yy, pp), n, n_boot)
        out[f"gauc_{part}"] = seed_interval([gauc(yy, p, gg) for p in pp])  # interval over seeds
    return out
