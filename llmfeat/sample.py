"""The rows of the jobs that hold their data in one process: torch training, the evaluations, the replay.

Such a job reads a bounded sample, never a whole table: every user while the users table has at most
`sample.max_users` rows, else that many users chosen by a hash of their id (the same users in every job and on
every run, on Spark or off it). Of each table it reads only the columns it uses and the rows of the sampled
users (or of the items and layers it names), streamed from the Delta files in batches and filtered on the way.
A read that would still pass `sample.max_rows` rows stops with an error naming the settings.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import SampleConf
from llmfeat.delta_io import ONE_AHEAD
from llmfeat.errors import UserError

__all__ = [
    "Sample",
    "SampleConf",
    "SampleTooLarge",
    "distinct_values",
    "scan",
    "scalar",
    "shortest_histories",
    "spark_user_sample",
    "user_rank",
]


class SampleTooLarge(UserError, ValueError):
    """A sampled read passed `sample.max_rows`; the message names the settings to change."""


def user_rank(user_id: Any) -> tuple[int, str]:
    """A user's place in the sample order: CRC-32 of the id's text, then the text (as F.crc32 on Spark)."""
    text = str(user_id)
    return zlib.crc32(text.encode()), text


def spark_user_sample(users: Any, max_users: int) -> Any:
    """The users `Sample` picks, chosen on the executors: a one-column frame of at most max_users ids."""
    from pyspark.sql import functions as F

    text = F.col("user_id").cast("string")
    ranked = users.select("user_id").distinct().orderBy(F.crc32(text), text)
    return ranked.limit(max_users)


class Sample:
    """Bounded reads from a lake (any backend: delta-rs reads what delta-spark wrote)."""

    def __init__(self, tables: Any, conf: SampleConf, versions: dict[str, int | None] | None = None):
        self.tables, self.conf, self.versions = tables, conf, versions or {}
        self.users: pa.Array | None = None  # None: every user (also while _users reads the users table)
        self.users = self._users()

    def _users(self) -> pa.Array | None:
        if not self.tables.exists("users"):
            return None
        ids = self._stream("users", ["user_id"], {})
        column = ids.column("user_id")
        if len(column) <= self.conf.max_users:
            return None
        ranked = sorted(column.to_pylist(), key=user_rank)[: self.conf.max_users]
        return pa.array(ranked, type=column.type)

    def read(self, name: str, columns: list[str] | None = None, **where: Collection[Any]) -> pa.Table:
        """`columns` of the table's rows (at its pinned version) whose column values are in `where`, and whose
        user is in the sample when the table has a user_id column."""
        return self._stream(name, columns, dict(where))

    def _table(self, name: str) -> Any:
        from deltalake import DeltaTable

        if not self.tables.exists(name):
            raise FileNotFoundError(f"Delta table {name!r} not found at {self.tables.path(name)}")
        return DeltaTable(self.tables.path(name), version=self.versions.get(name))

    def _stream(self, name: str, columns: list[str] | None, filters: dict[str, Any]) -> pa.Table:
        table = self._table(name)
        schema = pa.schema(table.schema().to_arrow())
        wanted = columns or list(schema.names)
        if self.users is not None and "user_id" in schema.names:
            filters.setdefault("user_id", self.users)
        if missing := [c for c in [*wanted, *filters] if c not in schema.names]:
            raise KeyError(f"{name}: no column {missing[0]!r} (columns: {schema.names})")
        sets = {c: _values(v).cast(schema.field(c).type) for c, v in filters.items()}
        kept, rows = [], 0
        for batch in _batches(table, list(dict.fromkeys([*wanted, *sets])), sets):
            rows += batch.num_rows
            if rows > self.conf.max_rows:
                raise SampleTooLarge(
                    f"{name}: the sample passed sample.max_rows={self.conf.max_rows:,} rows; lower "
                    f"sample.max_users (now {self.conf.max_users:,}) or raise sample.max_rows"
                )
            kept.append(batch.select(wanted))
        if kept:
            return pa.Table.from_batches(kept)
        return pa.schema([schema.field(c) for c in wanted]).empty_table()

    def ctr_tables(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        """(interactions, users, items) of the sampled users, the items as the ones those rows touch (all
        items while every user is in)."""
        inter = self.read("interactions")
        return inter, self.read("users"), self.items_of(inter)

    def items_of(self, inter: pa.Table) -> pa.Table:
        """The items the sampled rows touch (every item while every user is in)."""
        if self.users is None:
            return self.read("items")
        return self.read("items", item_id=pc.unique(inter.column("item_id")))


def distinct_values(
    tables: Any, name: str, columns: Collection[str], version: int | None = None
) -> dict[str, list[Any]]:
    """The distinct values of those `columns` the table has (lineage: a few), aggregated by delta-rs."""
    from deltalake import DeltaTable, QueryBuilder

    table = DeltaTable(tables.path(name), version=version)
    present = [c for c in columns if c in pa.schema(table.schema().to_arrow()).names]
    out = {}
    for c in present:
        sql = f'SELECT DISTINCT "{c}" AS v FROM t'
        result = pa.RecordBatchReader.from_stream(QueryBuilder().register("t", table).execute(sql)).read_all()
        out[c] = result.column("v").to_pylist()
    return out


def scalar(tables: Any, name: str, sql: str) -> Any:
    """One value a SQL aggregate over the table (as `t`) gives, computed by delta-rs as it scans."""
    from deltalake import DeltaTable, QueryBuilder

    query = QueryBuilder().register("t", DeltaTable(tables.path(name))).execute(sql)
    return pa.RecordBatchReader.from_stream(query).read_all().column(0)[0].as_py()


def _values(v: Collection[Any]) -> pa.Array:
    if isinstance(v, pa.ChunkedArray):
        return v.combine_chunks()
    return v if isinstance(v, pa.Array) else pa.array(list(v))


SCAN_BATCH_ROWS = 131_072  # pyarrow's default batch size


def scan(
    table: Any, columns: list[str], where: Any = None, batch_rows: int = SCAN_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """A Delta table version's `columns`, in file order and in record batches of at most `batch_rows` rows,
    filtered by the pyarrow expression `where`: a pyarrow scan with the filter pushed down (files and row
    groups pruned by their statistics), or delta-rs's own scan where deletion vectors or column mapping make
    the Parquet files differ from the table."""
    from deltalake import QueryBuilder
    from deltalake.exceptions import DeltaProtocolError

    try:
        dataset = table.to_pyarrow_dataset()
    except DeltaProtocolError:
        sql = "SELECT " + ", ".join(f'"{c}"' for c in columns) + " FROM t"
        for batch in pa.RecordBatchReader.from_stream(QueryBuilder().register("t", table).execute(sql)):
            kept = batch if where is None else batch.filter(where)
            for start in range(0, kept.num_rows, batch_rows):
                yield kept.slice(start, batch_rows)
        return
    yield from dataset.to_batches(columns=columns, filter=where, batch_size=batch_rows, **ONE_AHEAD)


def _batches(table: Any, columns: list[str], sets: dict[str, pa.Array]) -> Iterator[pa.RecordBatch]:
    """The table's rows whose column values are in `sets`."""
    import pyarrow.dataset as ds

    expr = None
    for c, values in sets.items():
        term = ds.field(c).isin(values)
        expr = term if expr is None else expr & term
    return scan(table, columns, expr)


def shortest_histories(user_behaviors: Any, cut: Any, n: int) -> list[str]:
    """A documented quick sample (Spark): the n users with the fewest behaviours before `cut` (at least one),
    ties by user id. Their histories are short, so few behaviours need encoding. n ids reach the driver."""
    from pyspark.sql import functions as F

    ub = user_behaviors.where(F.col("event_timestamp") < F.lit(cut))
    fewest = ub.groupBy("user_id").count().orderBy("count", F.length("user_id"), "user_id").limit(n)
    return [r["user_id"] for r in fewest.collect()]
