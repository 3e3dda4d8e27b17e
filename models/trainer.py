"""One training loop for every model here: Adam over shuffled mini-batches, early stopping on a held-out
score.

The model is not the trainer: callers pass a loss function over a batch of row indices and a score function
(higher is better, e.g. validation AUC); the best state is restored at the end.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

log = logging.getLogger(__name__)

B = TypeVar("B")  # a batch: row indices, or the tensors of a streamed batch


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 30  # as MarcConf.max_epochs (llmfeat/config.py), the compressor it was written for
    patience: int = 4
    seed: int = 0


@dataclass
class TrainHistory:
    train_loss: list[float] = field(default_factory=list)
    valid_score: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("-inf")
    extra: dict[str, list[float]] = field(default_factory=dict)


def epoch_bar(n: int) -> tqdm:
    """Epochs for a person at a terminal: no bar when stderr is not a TTY (logs stay clean) nor in worker
    processes (sweeps train many models at once); cleared when training ends."""
    worker = multiprocessing.parent_process() is not None
    return tqdm(range(n), desc="epochs", unit="epoch", leave=False, disable=True if worker else None)


def train_early_stopping(
    model: nn.Module,
    rows: np.ndarray,
    loss_fn: Callable[[np.ndarray], Tensor | tuple[Tensor, dict[str, float]]],
    score_fn: Callable[[], float],
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    params: list[nn.Parameter] | None = None,
    keep_start: bool = False,
    train_module: nn.Module | None = None,
) -> TrainHistory:
    """Train on `rows` (indices given to loss_fn in batches); stop after `patience` epochs without a better
    score. `params`: the parameters to update (default: all). `keep_start`: score the model before training
    too (epoch -1) and keep it when no epoch beats it, e.g. a residual branch that starts at zero.
    `train_module`: the part of `model` in train mode while training (default: all of it); the rest stays in
    eval mode, e.g. a frozen part whose dropout must behave as it does at scoring."""
    rng = np.random.default_rng(cfg.seed)

    def index_batches(_epoch: int) -> Iterator[np.ndarray]:
        perm = rng.permutation(rows)  # a fresh order each epoch, the seed's
        for start in range(0, len(perm), cfg.batch_size):
            yield perm[start : start + cfg.batch_size]

    return train_on_batches(
        model, index_batches, len, loss_fn, score_fn, cfg, on_epoch, params, keep_start, train_module
    )


def train_on_batches(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[B]],
    batch_rows: Callable[[B], int],
    loss_fn: Callable[[B], Tensor | tuple[Tensor, dict[str, float]]],
    score_fn: Callable[[], float],
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    params: list[nn.Parameter] | None = None,
    keep_start: bool = False,
    train_module: nn.Module | None = None,
    after_backward: Callable[[], None] | None = None,
) -> TrainHistory:
    """The loop of `train_early_stopping` over any batches: `epoch_batches(epoch)` gives one epoch's batches
    (row indices, or tensors a stream reads from files: models/ctr/stream.py), `batch_rows(batch)` their
    size; a batch of fewer than 2 rows is skipped. `after_backward`: called between each backward pass and
    its step (workers average their gradients there: models/ctr/workers.py)."""
    torch.manual_seed(cfg.seed)
    trained = list(model.parameters()) if params is None else params
    opt = torch.optim.Adam(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory()
    best_state = copy.deepcopy(model.state_dict())
    if keep_start:
        model.eval()
        with torch.no_grad():
            history.best_score = score_fn()
    epochs = epoch_bar(cfg.max_epochs)
    for epoch in epochs:
        model.train(train_module is None)
        if train_module is not None:
            train_module.train()
        losses = []
        for batch in epoch_batches(epoch):
            if batch_rows(batch) < 2:
                continue
            out = loss_fn(batch)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            opt.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            losses.append(float(loss.detach()))
            for k, v in parts.items():
                history.extra.setdefault(k, []).append(v)
        model.eval()
        with torch.no_grad():
            score = score_fn()
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        history.train_loss.append(mean_loss)
        history.valid_score.append(score)
        if on_epoch:
            on_epoch(epoch, mean_loss, score)
        epochs.set_postfix(loss=f"{mean_loss:.4f}", score=f"{score:.4f}")
        if score > history.best_score:
            history.best_score, history.best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - history.best_epoch >= cfg.patience:
            break
    epochs.close()
    model.load_state_dict(best_state)
    model.eval()
    return history
