"""The training set read back in bounded Arrow batches: a torch IterableDataset over its Parquet files.

Notation: B a mini-batch of rows (ctr.batch_size), R the rows of one Arrow batch read from a file
(ctr.stream_batch_rows), S the shuffle buffer (ctr.stream_buffer_rows).

The job resolves the table (a Delta version's data files, spark_jobs/train_ctr.py) and hands over the file
paths or URIs; nothing here knows Delta, so the files must be the table as they are (no deletion vectors,
no partition columns). Each epoch reads the files in an order of their own (seeded by seed and epoch), R rows
at a time, keeps the rows of one role (models/ctr/roles.py), and mixes them in a shuffle buffer: a mini-batch
is drawn from up to S rows of many files, so one file's users or days never make a batch on their own. The
rows held at once never pass S + R (`peak_rows` counts them), however many rows the table has.

Each mini-batch is encoded by the FeatureEncoder (models/ctr/features.py) into the CtrInputs the in-memory
trainer uses, with its labels: (CtrInputs, (B,) float32).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyarrow import fs
from torch.utils.data import IterableDataset, get_worker_info

from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrInputs
from llmfeat.models.ctr.roles import ROLE_COLUMNS, Role, RowRoles

Encoded = tuple[CtrInputs, torch.Tensor]  # a mini-batch's inputs and (B,) float32 labels
READ_BUFFER = 1 << 20  # bytes read from a column chunk at a time


def open_file(path: str) -> pa.NativeFile:
    """A data file to read: `path` a local path or a URI (file://, s3://, ...)."""
    filesystem, where = fs.FileSystem.from_uri(path) if "://" in path else (fs.LocalFileSystem(), path)
    return filesystem.open_input_file(where)


def file_batches(path: str, columns: Sequence[str], read_rows: int) -> Iterator[pa.RecordBatch]:
    """A Parquet file's `columns`, `read_rows` rows at a time. Column chunks are read through a buffer of
    READ_BUFFER bytes, page by page, not pre-buffered whole: a row group of a million rows never sits in
    memory at once (measured: a 150 MB row group read in batches of 8,192 rows peaks at 16 MB of Arrow
    memory this way, 164 MB pre-buffered)."""
    with open_file(path) as source:
        parquet = pq.ParquetFile(source, buffer_size=READ_BUFFER, pre_buffer=False)
        yield from parquet.iter_batches(batch_size=read_rows, columns=list(columns))


def scan_files(files: Sequence[str], columns: Sequence[str], read_rows: int) -> Iterator[pa.RecordBatch]:
    """Every row of `files` in their order, `read_rows` at a time."""
    for path in files:
        yield from file_batches(path, columns, read_rows)


def file_schema(path: str) -> pa.Schema:
    with open_file(path) as source:
        return pq.read_schema(source)


@dataclass
class ShuffleBuffer:
    """Rows in, mini-batches of `batch_rows` out in random order. Once it holds `capacity` rows it shuffles
    them and gives out mini-batches until about half are left, which mix with the rows that come next."""

    capacity: int
    batch_rows: int
    rng: np.random.Generator
    rows: int = 0
    peak_rows: int = 0  # the most rows held at once
    _chunks: list[pa.Table | pa.RecordBatch] = field(default_factory=list)

    def push(self, batch: pa.RecordBatch) -> Iterator[pa.Table]:
        self._chunks.append(batch)
        self.rows += batch.num_rows
        self.peak_rows = max(self.peak_rows, self.rows)
        while self.rows >= self.capacity:
            yield from self._emit(keep=self.capacity // 2)

    def drain(self) -> Iterator[pa.Table]:
        """The rows left at the end of an epoch, shuffled; the last mini-batch may be short."""
        if self.rows:
            yield from self._emit(keep=0)

    def _emit(self, keep: int) -> Iterator[pa.Table]:
        table = pa.concat_tables([as_table(c) for c in self._chunks])
        order = self.rng.permutation(table.num_rows)
        n_out = table.num_rows
        if keep:  # whole mini-batches, about `keep` rows left
            n_out = max(self.batch_rows, (table.num_rows - keep) // self.batch_rows * self.batch_rows)
        out, rest = table.take(order[:n_out]), table.take(order[n_out:])  # copies: the chunks are freed
        self._chunks, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        for start in range(0, n_out, self.batch_rows):
            yield out.slice(start, self.batch_rows)


def as_table(chunk: pa.Table | pa.RecordBatch) -> pa.Table:
    return chunk if isinstance(chunk, pa.Table) else pa.Table.from_batches([chunk])


class TrainingSetStream(IterableDataset[Encoded]):
    """The rows of `role` in `files`, once per epoch: shuffled mini-batches (`shuffle`), or the files' own
    order in batches of up to `read_rows` (scoring). Iterating gives encoded mini-batches; `tables()` the raw
    rows. `shard` = (rank, world): this worker's share of the files (every file read by exactly one worker);
    DataLoader workers split that share again."""

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        roles: RowRoles | None = None,
        role: Role | None = None,
        encoder: FeatureEncoder | None = None,
        batch_rows: int = 1024,
        buffer_rows: int = 65_536,
        read_rows: int = 8_192,
        seed: int = 0,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
    ):
        if buffer_rows < batch_rows:
            raise ValueError(f"a shuffle buffer of {buffer_rows} rows cannot hold a batch of {batch_rows}")
        if role is not None and roles is None:
            raise ValueError(f"role {role!r} needs the set's RowRoles")
        self.files, self.roles, self.role, self.encoder = list(files), roles, role, encoder
        wanted = [*columns, *(ROLE_COLUMNS if role else ())]
        self.columns = list(dict.fromkeys(wanted))
        self.batch_rows, self.buffer_rows, self.read_rows = batch_rows, buffer_rows, read_rows
        self.seed, self.shuffle, self.shard = seed, shuffle, shard
        self.epoch = 0
        self.peak_rows = 0  # the most rows held at once, over every epoch read so far

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads: its file order and shuffle come from the seed and the epoch."""
        self.epoch = epoch

    def epoch_files(self) -> list[str]:
        """This worker's files in this epoch's order."""
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.files))
        rank, world = self.shard
        mine = [self.files[i] for i in order[rank::world]]
        worker = get_worker_info()
        return mine if worker is None else mine[worker.id :: worker.num_workers]

    def _role_batches(self) -> Iterator[pa.RecordBatch]:
        for path in self.epoch_files():
            for batch in file_batches(path, self.columns, self.read_rows):
                if self.role is not None and self.roles is not None:
                    batch = batch.filter(pa.array(self.roles.mask(batch, self.role)))
                if batch.num_rows:
                    yield batch

    def tables(self) -> Iterator[pa.Table]:
        """One epoch's rows as Arrow tables: shuffled mini-batches, or the files' batches in order."""
        if not self.shuffle:
            for batch in self._role_batches():
                self.peak_rows = max(self.peak_rows, batch.num_rows)
                yield pa.Table.from_batches([batch])
            return
        rng = np.random.default_rng((self.seed, self.epoch, 1))
        buffer = ShuffleBuffer(self.buffer_rows, self.batch_rows, rng)
        try:
            for batch in self._role_batches():
                yield from buffer.push(batch)
            yield from buffer.drain()
        finally:
            self.peak_rows = max(self.peak_rows, buffer.peak_rows)

    def __iter__(self) -> Iterator[Encoded]:
        if self.encoder is None:
            raise ValueError("TrainingSetStream without an encoder gives raw rows only: iterate tables()")
        for table in self.tables():
            yield encode(self.encoder, table)


def encode(encoder: FeatureEncoder, table: pa.Table) -> Encoded:
    """Arrow rows of the training set -> the encoder's CtrInputs and (B,) float32 labels."""
    frame = table.to_pandas()
    return encoder.transform(frame), torch.from_numpy(frame["label"].to_numpy(np.float32))
