"""The DNN fitted over a streamed training set: the stages of `fit_model` (models/ctr/train.py), with
mini-batches read from the table's files (models/ctr/stream.py) instead of indexed in a frame.

Notation: V the valid rows. Held at once: the shuffle buffer (ctr.stream_buffer_rows + ctr.stream_batch_rows
rows), the model, the encoder's vocabularies, and of the valid rows only their labels, scores and time folds
(a few bytes each, for AUC and the fold LogLoss), never their features: each epoch scores them afresh from
the files.

Same seed, same files, same model: the file order and the shuffle of each epoch come from (seed, epoch), the
id dropout from (seed, 1), torch's draws from the seed as in the in-memory trainer. The stream is not the
in-memory trainer's row order, so the two give different (equally good) models from one seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from llmfeat.errors import UserError
from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrInputs, CtrModel
from llmfeat.models.ctr.roles import Role, RowRoles
from llmfeat.models.ctr.stream import Encoded, TrainingSetStream, encode, file_schema
from llmfeat.models.ctr.stream_encoder import fit_columns, fit_encoder_stream, input_columns
from llmfeat.models.ctr.train import (
    MetricLogger,
    branch_id_dropout,
    drop_ids,
    epoch_logger,
    model_config,
    score_valid,
    time_folds,
)
from llmfeat.models.ctr.workers import Workers
from llmfeat.models.trainer import TrainConfig, train_on_batches

if TYPE_CHECKING:
    from llmfeat.config import CtrConf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSource:
    """A training set as Parquet files (the table exactly: no deletion vectors, no partition columns), the
    roles of its rows, and how it is read. `shard` (rank, world): the share of the files this worker trains
    on; the encoder and the valid scores always read every file, so that every worker agrees on them."""

    files: tuple[str, ...]
    roles: RowRoles
    buffer_rows: int = 65_536
    read_rows: int = 8_192
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        if not self.files:
            raise UserError("the training set has no data files: is the table empty?")

    def schema(self) -> pa.Schema:
        return file_schema(self.files[0])

    def stream(
        self,
        columns: Sequence[str],
        role: Role | None,
        encoder: FeatureEncoder | None = None,
        batch_rows: int = 1024,
        seed: int = 0,
        shuffle: bool = True,
    ) -> TrainingSetStream:
        """The rows of `role` (every row: None): shuffled mini-batches of this worker's files, or (not
        `shuffle`) every file's rows in order."""
        return TrainingSetStream(
            self.files, columns, self.roles, role, encoder, batch_rows, max(self.buffer_rows, batch_rows),
            self.read_rows, seed, shuffle, self.shard if shuffle else (0, 1),
        )  # fmt: skip

    def scan(self, columns: Sequence[str], role: Role | None = None) -> Iterator[pa.RecordBatch]:
        """Every row (of `role`) in file order, in batches of at most read_rows."""
        for table in self.stream(columns, role, shuffle=False).tables():
            yield from table.to_batches()


@dataclass
class ValidRows:
    """What the valid metrics need of the valid rows: labels (V,), time folds (positions), the shares of
    rows whose user / item the encoder does not know, and a way to score them again."""

    source: StreamSource
    columns: list[str]
    encoder: FeatureEncoder
    y: np.ndarray
    folds: list[np.ndarray]
    cold: tuple[float, float]

    @classmethod
    def read(cls, source: StreamSource, columns: list[str], encoder: FeatureEncoder, k: int) -> ValidRows:
        ys, times, cold_users, cold_items = [], [], 0, 0
        for batch in source.scan([*columns, "event_timestamp"], "valid"):
            frame = batch.to_pandas()
            ys.append(frame["label"].to_numpy(np.float32))
            times.append(frame["event_timestamp"])
            cold_users += int(frame["user_id"].map(encoder.user_index).isna().sum())
            cold_items += int(frame["item_id"].map(encoder.item_index).isna().sum())
        y = np.concatenate(ys) if ys else np.zeros(0, np.float32)
        if not len(y):
            raise UserError("the training set has no valid rows: early stopping needs the valid split")
        stamps = pd.DataFrame({"event_timestamp": pd.concat(times, ignore_index=True)})
        folds = time_folds(stamps, np.arange(len(y)), k)
        return cls(source, columns, encoder, y, folds, (cold_users / len(y), cold_items / len(y)))

    def predict(self, forward: Callable[[CtrInputs], torch.Tensor]) -> np.ndarray:
        """(V,) probabilities of `forward`, the valid rows read again in file order."""
        parts = []
        for table in self.source.stream(self.columns, "valid", shuffle=False).tables():
            x, _ = encode(self.encoder, table)
            parts.append(torch.sigmoid(forward(x)).numpy())
        return np.concatenate(parts)


def epochs(stream: TrainingSetStream, workers: Workers | None = None) -> Callable[[int], Iterable[Encoded]]:
    """The trainer's epoch -> batches, each epoch reading the stream in that epoch's order (in lockstep with
    the other workers)."""

    def batches(epoch: int) -> Iterable[Encoded]:
        stream.set_epoch(epoch)
        return stream if workers is None else workers.lockstep(stream)

    return batches


def bce(logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logit, y)


def fit_model_stream(
    source: StreamSource,
    use_llm: bool,
    cfg: CtrConf,
    log_metrics: MetricLogger | None = None,
    workers: Workers | None = None,
) -> tuple[CtrModel, FeatureEncoder]:
    """`fit_model` over a stream: the encoder in one pass, the id model early-stopped on valid AUC, then with
    LLM vectors the residual branch on the residual rows (source.roles), id part frozen in eval mode, ids
    dropped at ctr.id_dropout, selected by the valid LogLoss over time folds with the zero branch a
    candidate. `workers`: this process is one of several training the same model (models/ctr/workers.py),
    each on its share of the files."""
    if workers is not None:
        source = replace(source, shard=(workers.rank, workers.world))
    schema = source.schema()
    encoder = fit_encoder_stream(source.scan(fit_columns(schema, use_llm)), schema, source.roles, use_llm)
    torch.manual_seed(cfg.seed)  # before the model exists: the same id part with and without LLM fields
    model = CtrModel(model_config(cfg, encoder))
    columns = input_columns(encoder, schema)
    valid = ValidRows.read(source, columns, encoder, cfg.residual_folds)
    metrics: dict[str, float] = {}

    def valid_metrics(forward: Callable[[CtrInputs], torch.Tensor]) -> dict[str, float]:
        return score_valid(metrics, valid.y, valid.predict(forward), valid.folds)

    def rows(batch: Encoded) -> int:
        return len(batch[1])

    fit = source.stream(columns, "fit", encoder, cfg.batch_size, cfg.seed)
    id_train = TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed)
    train_on_batches(
        model,
        epochs(fit, workers),
        rows,
        lambda b: bce(model.id_logit(b[0]), b[1]),
        agreed(lambda: valid_metrics(model.id_logit)["valid_auc"], workers),
        id_train,
        epoch_logger("id", metrics, log_metrics),
        params=model.id_parameters(),
        after_backward=None if workers is None else workers.average_gradients(model.id_parameters()),
    )
    held(log_metrics, "id", fit)
    if model.residual is not None:
        for p in model.id_parameters():
            p.requires_grad_(False)
        rates = branch_id_dropout(cfg, valid.cold, log_metrics)
        drop_rng = np.random.default_rng((cfg.seed, 1))
        branch_rows = source.stream(columns, "residual", encoder, cfg.batch_size, cfg.seed)
        res_train = TrainConfig(
            cfg.residual_lr, cfg.residual_weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed
        )
        branch = list(model.residual.parameters())
        train_on_batches(
            model,
            epochs(branch_rows, workers),
            rows,
            lambda b: bce(model(drop_ids(b[0], rates, drop_rng)), b[1]),
            agreed(lambda: -valid_metrics(model)["valid_fold_logloss"], workers),
            res_train,
            epoch_logger("residual", metrics, log_metrics),
            branch,
            keep_start=True,
            train_module=model.residual,
            after_backward=None if workers is None else workers.average_gradients(branch),
        )
        held(log_metrics, "residual", branch_rows)
        for p in model.id_parameters():
            p.requires_grad_(True)
    return model, encoder


def agreed(score_fn: Callable[[], float], workers: Workers | None) -> Callable[[], float]:
    return score_fn if workers is None else workers.agree(score_fn)


def held(log_metrics: MetricLogger | None, stage: str, stream: TrainingSetStream) -> None:
    """The most rows a stage's stream held at once, logged: the memory bound as it was met."""
    log.info("%s stage: at most %d rows held at once", stage, stream.peak_rows)
    if log_metrics is not None:
        log_metrics({f"{stage}_stream_peak_rows": float(stream.peak_rows)}, 0)
