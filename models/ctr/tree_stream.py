"""LightGBM over a streamed training set: the tree matrix of models/ctr/tree.py built from the table's files
through `lightgbm.Sequence` objects, one per file and role, instead of from one in-memory matrix.

LightGBM reads a Sequence twice: a sample of rows by position to find the bins (bin_construct_sample_cnt),
then every row in order, `batch_size` at a time, pushed into its binned dataset. So a Sequence needs random
access: a first pass counts, per read batch of the file (ctr.stream_batch_rows rows), the rows of its role,
and keeps their labels; a row is then found by its batch, which is read again and encoded when asked for
(one decoded batch kept, read forward, restarted only when asked for an earlier batch). Held at once: one
batch's rows and matrix, the labels, and LightGBM's own binned dataset (about one byte a feature a row,
which any LightGBM training holds), never the raw rows nor a float matrix of the table.

The fit rows' ids go to the "unseen" level at the valid rows' rate, as `unseen_ids` does in memory; the
draws come from (seed, 1, file, batch), so the same seed and files give the same trees.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightgbm
import numpy as np
import pyarrow as pa

from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.roles import ROLE_COLUMNS, Role, RowRoles
from llmfeat.models.ctr.stream import encode, file_batches
from llmfeat.models.ctr.stream_encoder import fit_columns, fit_encoder_stream, input_columns
from llmfeat.models.ctr.stream_train import StreamSource
from llmfeat.models.ctr.tree import CATEGORICAL, boost, categorical_names, tree_feature_names, tree_matrix

if TYPE_CHECKING:
    from llmfeat.config import CtrConf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleChunks:
    """Where one role's rows lie in one file: per read batch, how many of its rows play the role."""

    path: str
    counts: np.ndarray  # (K,) int64 role rows in each read batch
    starts: np.ndarray  # (K,) position of each batch's first role row in the Sequence
    labels: np.ndarray  # (rows,) float32, in Sequence order

    @classmethod
    def count(cls, path: str, roles: RowRoles, role: Role, read_rows: int) -> RoleChunks:
        counts, labels = [], []
        for batch in file_batches(path, ["label", *ROLE_COLUMNS], read_rows):
            keep = roles.mask(batch, role)
            counts.append(int(keep.sum()))
            labels.append(batch.column("label").to_numpy(zero_copy_only=False)[keep].astype(np.float32))
        n = np.asarray(counts, np.int64)
        starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        return cls(path, n, starts, np.concatenate(labels) if labels else np.zeros(0, np.float32))

    @property
    def rows(self) -> int:
        return int(self.counts.sum())


class EncodedRows(lightgbm.Sequence):
    """One file's rows of one role as tree-matrix rows (2 + G + F + Du + Di float64), by position."""

    def __init__(
        self,
        chunks: RoleChunks,
        source: StreamSource,
        role: Role,
        encoder: FeatureEncoder,
        columns: list[str],
        unseen: tuple[float, float] | None,
        seed: tuple[int, ...],
    ):
        self.chunks, self.source, self.role, self.encoder = chunks, source, role, encoder
        self.columns, self.unseen, self.seed = columns, unseen, seed
        self.batch_size = source.read_rows  # LightGBM pushes this many rows at a time
        self._reader: Iterator[pa.RecordBatch] | None = None
        self._next = 0  # the batch the reader gives next
        self._cached: tuple[int, np.ndarray] | None = None  # (batch, its matrix)

    def __len__(self) -> int:
        return self.chunks.rows

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, numbers.Integral):
            k = self._batch_of(int(idx))
            return self._matrix(k)[int(idx) - self.chunks.starts[k]]
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(len(self))
            parts = []
            while start < stop:
                k = self._batch_of(start)
                offset = start - int(self.chunks.starts[k])
                take = min(stop - start, int(self.chunks.counts[k]) - offset)
                parts.append(self._matrix(k)[offset : offset + take])
                start += take
            return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if isinstance(idx, list):
            return np.stack([self[i] for i in idx])
        raise TypeError(f"EncodedRows index must be an integer, slice or list, got {type(idx).__name__}")

    def _batch_of(self, position: int) -> int:
        """The read batch holding the role row at `position` (batches without role rows are skipped)."""
        return int(np.searchsorted(self.chunks.starts + self.chunks.counts, position, side="right"))

    def _matrix(self, k: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        if self._reader is None or k < self._next:  # LightGBM reads forward; restart only when it goes back
            self._reader = file_batches(self.chunks.path, self.columns, self.source.read_rows)
            self._next = 0
        while True:
            batch = next(self._reader)
            self._next += 1
            if self._next - 1 == k:
                break
        rows = batch.filter(pa.array(self.source.roles.mask(batch, self.role)))
        if rows.num_rows != self.chunks.counts[k]:
            raise RuntimeError(f"{self.chunks.path} changed while it was read: batch {k} has other rows")
        x, _ = encode(self.encoder, pa.Table.from_batches([rows]))
        matrix = tree_matrix(x).astype(np.float64)  # LightGBM samples a Sequence in doubles
        if self.unseen is not None:
            rng = np.random.default_rng((*self.seed, k))
            for col, rate in enumerate(self.unseen):
                matrix[rng.random(len(matrix)) < rate, col] = 0.0
        self._cached = (k, matrix)
        return matrix


def unseen_rates(source: StreamSource, encoder: FeatureEncoder, cfg: CtrConf) -> tuple[float, float]:
    """The rates at which fit rows' (user, item) ids go unseen: the valid rows' shares of ids outside the
    encoder's vocabularies, or ctr.id_dropout."""
    if cfg.id_dropout != "valid_rate":
        return float(cfg.id_dropout), float(cfg.id_dropout)
    rows, users, items = 0, 0, 0
    for batch in source.scan(["user_id", "item_id"], "valid"):
        frame = batch.to_pandas()
        rows += len(frame)
        users += int(frame["user_id"].map(encoder.user_index).isna().sum())
        items += int(frame["item_id"].map(encoder.item_index).isna().sum())
    return (users / rows, items / rows) if rows else (0.0, 0.0)


def role_rows(
    source: StreamSource,
    role: Role,
    encoder: FeatureEncoder,
    columns: list[str],
    unseen: tuple[float, float] | None,
    seed: int,
) -> tuple[list[EncodedRows], np.ndarray]:
    """One Sequence per file with rows of `role`, and their labels in the same order."""
    seqs = []
    for number, path in enumerate(source.files):
        chunks = RoleChunks.count(path, source.roles, role, source.read_rows)
        if chunks.rows:
            seqs.append(EncodedRows(chunks, source, role, encoder, columns, unseen, (seed, 1, number)))
    labels = [s.chunks.labels for s in seqs]
    return seqs, np.concatenate(labels) if labels else np.zeros(0, np.float32)


def fit_tree_stream(
    source: StreamSource, use_llm: bool, cfg: CtrConf, log_metrics: Any = None
) -> tuple[lightgbm.Booster, FeatureEncoder]:
    """`fit_tree` over a stream: the encoder in one pass, then the booster on the fit rows' Sequences,
    early-stopped on the valid rows'."""
    schema = source.schema()
    encoder = fit_encoder_stream(source.scan(fit_columns(schema, use_llm)), schema, source.roles, use_llm)
    columns = [*input_columns(encoder, schema), *ROLE_COLUMNS]
    names = tree_feature_names(encoder)
    unseen = unseen_rates(source, encoder, cfg)
    for name, rate in zip(CATEGORICAL, unseen, strict=True):
        log.info("trees: %s unseen in %.1f%% of fit rows", name, 100 * rate)
    fit, y_fit = role_rows(source, "fit", encoder, columns, unseen, cfg.seed)
    valid, y_valid = role_rows(source, "valid", encoder, columns, None, cfg.seed)
    if not fit or not valid:
        raise ValueError("the training set needs fit and valid rows to boost and stop early")
    train = lightgbm.Dataset(
        fit, y_fit, feature_name=names, categorical_feature=categorical_names(names), free_raw_data=True
    )
    stop = lightgbm.Dataset(valid, y_valid, reference=train)
    log.info("trees: %d fit and %d valid rows from %d files", len(y_fit), len(y_valid), len(source.files))
    return boost(train, stop, cfg, log_metrics), encoder
