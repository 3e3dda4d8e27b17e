"""Feast's file offline store, reading each Delta source as its current snapshot, and materializing it in
bounded batches.

Feast's file offline store (feast.infra.offline_stores.dask, Feast 0.67) reads a FileSource declared with
DeltaFormat as a folder of Parquet files. The files a MERGE replaced or a delete removed stay in that folder
until VACUUM (7 days here, for time travel), so point-in-time joins and materialization would also see rows
that are no longer in the table: a deleted item's metadata, a recomputed day's old counters beside the new
ones. This store is that one with every Delta source read as the Parquet files of the table's current version
(the Delta log, through delta-rs), or, where plain Parquet cannot represent the table (deletion vectors,
column mapping, partition columns), from delta-rs itself. Other sources are read as Feast reads them.

Materialization (`materialization: pull_latest_features: true`) asks the store for each entity's newest row
of the window. Feast's file store would load the whole window into memory first; this one streams the Delta
snapshot in record batches of `batch_rows` rows and keeps one row per entity key (`newest_per_key`), so the
process holds about two rows per entity and one batch, whatever the table's history.

feature_store.yaml:
    offline_store:
      type: llmfeat.feast_delta.DeltaFileOfflineStore
      batch_rows: 65536            # optional: rows per record batch while materializing
    materialization:
      pull_latest_features: true
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import dask.dataframe as dd
import feast.infra.offline_stores.dask as feast_dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast.data_format import DeltaFormat
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob
from pydantic import PositiveInt

from llmfeat.feast_repo import FILE_STORE
from llmfeat.sample import scan

_feast_read = feast_dask._read_datasource
BATCH_ROWS = 65_536


def read_snapshot(data_source: Any, repo_path: Any) -> dd.DataFrame:
    """A Delta source's current version as a dask frame; any other source as Feast reads it."""
    if not isinstance(data_source.file_format, DeltaFormat):
        return _feast_read(data_source, repo_path)
    table = _delta_table(data_source, repo_path)
    files = table.file_uris()
    if files and table.protocol().min_reader_version == 1 and not table.metadata().partition_columns:
        return dd.read_parquet(files)  # exactly the version's files: what Delta readers read
    return dd.from_pandas(table.to_pandas(), npartitions=1)  # delta-rs applies what Parquet cannot say


# Every read of the file offline store goes through this module-level function (history joins and
# materialization alike), so replacing it is the one change that covers both.
feast_dask._read_datasource = read_snapshot


def _delta_table(data_source: Any, repo_path: Any) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(FileSource.get_uri_for_file_path(repo_path=repo_path, uri=data_source.file_options.uri))


def newest_per_key(batches: Iterable[pa.RecordBatch], keys: list[str], order: list[str]) -> pa.Table | None:
    """Each key's newest row (largest `order` values, compared in turn; nulls oldest) over a stream of
    record batches; None for no batch. The rows read since the last compaction are compacted with the kept
    ones as soon as they outnumber them, so at most about twice one row per key, plus one batch, is held."""
    kept: pa.Table | None = None
    pending: list[pa.Table] = []
    waiting = 0
    for batch in batches:
        pending.append(pa.Table.from_batches([batch]))
        waiting += batch.num_rows
        if waiting > (0 if kept is None else kept.num_rows):
            kept, pending, waiting = _compact(kept, pending, keys, order), [], 0
    return _compact(kept, pending, keys, order) if pending else kept


def _compact(kept: pa.Table | None, pending: list[pa.Table], keys: list[str], order: list[str]) -> pa.Table:
    return _newest(pa.concat_tables(pending if kept is None else [kept, *pending]), keys, order)


def _newest(table: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    ranked = table.take(pc.sort_indices(table, [(c, "descending", "at_end") for c in order]))
    ranked = ranked.append_column("__row", pa.array(np.arange(ranked.num_rows, dtype=np.int64)))
    first = ranked.group_by(keys, use_threads=False).aggregate([("__row", "min")])
    return ranked.take(first["__row_min"]).drop_columns(["__row"])


def newest_in_window(
    data_source: Any,
    repo_path: Any,
    keys: list[str],
    features: list[str],
    order: list[str],
    start: datetime | None,
    end: datetime | None,
    batch_rows: int,
) -> pa.Table:
    """The newest row per entity key of a Delta source's current version whose timestamp (order[0]) lies in
    [start, end], as Feast's file store gives it (timestamps in UTC), read in batches of `batch_rows`."""
    import pyarrow.dataset as ds

    table = _delta_table(data_source, repo_path)
    schema = pa.schema(table.schema().to_arrow())
    columns = list(dict.fromkeys([*keys, *features, *order]))
    if missing := [c for c in columns if c not in schema.names]:
        raise KeyError(f"{data_source.path}: no column {missing[0]!r} (columns: {schema.names})")
    ts, field = schema.field(order[0]).type, ds.field(order[0])
    where = None if start is None else field >= pa.scalar(_as(ts, start), type=ts)
    if end is not None:
        before = field <= pa.scalar(_as(ts, end), type=ts)
        where = before if where is None else where & before
    newest = newest_per_key(scan(table, columns, where, batch_rows), keys, order)
    out = newest if newest is not None else pa.schema([schema.field(c) for c in columns]).empty_table()
    for c in order:  # Feast's file store makes tz-naive event times UTC; so does this
        kind = out.schema.field(c).type
        if pa.types.is_timestamp(kind) and kind.tz is None:
            utc = out[c].cast(pa.timestamp(kind.unit, "UTC"))
            out = out.set_column(out.schema.get_field_index(c), c, utc)
    return out


def _as(ts: pa.DataType, when: datetime) -> datetime:
    """A bound comparable with a timestamp column: UTC, naive where the column is (naive means UTC)."""
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    return aware if getattr(ts, "tz", None) else aware.astimezone(UTC).replace(tzinfo=None)


class NewestRows(RetrievalJob):
    """A materialization read: its rows are computed when Feast asks for them (to_arrow / to_df)."""

    def __init__(self, compute: Callable[[], pa.Table]):
        self._compute = compute

    @property
    def full_feature_names(self) -> bool:
        return False

    @property
    def on_demand_feature_views(self) -> list[Any]:
        return []

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._compute()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._compute().to_pandas()

    @property
    def metadata(self) -> None:
        return None


class DeltaFileOfflineStoreConfig(feast_dask.DaskOfflineStoreConfig):
    type: Literal["llmfeat.feast_delta.DeltaFileOfflineStore"] = FILE_STORE  # type: ignore[assignment]
    batch_rows: PositiveInt = BATCH_ROWS  # rows per record batch a Delta source is read in to materialize


class DeltaFileOfflineStore(feast_dask.DaskOfflineStore):
    """The file offline store; importing this module makes it read Delta sources by their log, and pull each
    entity's newest row in bounded batches."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config: Any,
        data_source: Any,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        delta = isinstance(getattr(data_source, "file_format", None), DeltaFormat)
        if not delta or not join_key_columns:  # other formats, and views without entities: Feast's own read
            return feast_dask.DaskOfflineStore.pull_latest_from_table_or_query(
                config, data_source, join_key_columns, feature_name_columns, timestamp_field,
                created_timestamp_column, start_date, end_date,
            )  # fmt: skip
        order = [timestamp_field, *([created_timestamp_column] if created_timestamp_column else [])]
        batch_rows = getattr(config.offline_store, "batch_rows", BATCH_ROWS)
        return NewestRows(
            lambda: newest_in_window(
                data_source,
                config.repo_path,
                join_key_columns,
                feature_name_columns,
                order,
                start_date,
                end_date,
                batch_rows,
            )  # fmt: skip
        )
