"""Feast's file offline store, reading each Delta source as its current snapshot.

Feast's file offline store (feast.infra.offline_stores.dask, Feast 0.67) reads a FileSource declared with
DeltaFormat as a folder of Parquet files. The files a MERGE replaced or a delete removed stay in that folder
until VACUUM (7 days here, for time travel), so point-in-time joins and materialization would also see rows
that are no longer in the table: a deleted item's metadata, a recomputed day's old counters beside the new
ones. This store is that one with every Delta source read as the Parquet files of the table's current version
(the Delta log, through delta-rs), or, where plain Parquet cannot represent the table (deletion vectors,
column mapping, partition columns), from delta-rs itself. Other sources are read as Feast reads them.

feature_store.yaml:
    offline_store:
      type: llmfeat.feast_delta.DeltaFileOfflineStore
"""

from __future__ import annotations

from typing import Any, Literal

import dask.dataframe as dd
import feast.infra.offline_stores.dask as feast_dask
from feast.data_format import DeltaFormat
from feast.infra.offline_stores.file_source import FileSource

from llmfeat.feast_repo import FILE_STORE

_feast_read = feast_dask._read_datasource


def read_snapshot(data_source: Any, repo_path: Any) -> dd.DataFrame:
    """A Delta source's current version as a dask frame; any other source as Feast reads it."""
    if not isinstance(data_source.file_format, DeltaFormat):
        return _feast_read(data_source, repo_path)
    from deltalake import DeltaTable

    uri = FileSource.get_uri_for_file_path(repo_path=repo_path, uri=data_source.file_options.uri)
    table = DeltaTable(uri)
    files = table.file_uris()
    if files and table.protocol().min_reader_version == 1 and not table.metadata().partition_columns:
        return dd.read_parquet(files)  # exactly the version's files: what Delta readers read
    return dd.from_pandas(table.to_pandas(), npartitions=1)  # delta-rs applies what Parquet cannot say


# Every read of the file offline store goes through this module-level function (history joins and
# materialization alike), so replacing it is the one change that covers both.
feast_dask._read_datasource = read_snapshot


class DeltaFileOfflineStoreConfig(feast_dask.DaskOfflineStoreConfig):
    type: Literal["llmfeat.feast_delta.DeltaFileOfflineStore"] = FILE_STORE  # type: ignore[assignment]


class DeltaFileOfflineStore(feast_dask.DaskOfflineStore):
    """The file offline store; importing this module makes it read Delta sources by their log."""
