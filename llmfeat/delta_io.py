"""Delta Lake I/O behind one small interface, with two backends that write ordinary Delta tables.

- `RustDelta` (default, `delta.backend: delta-rs`): the `deltalake` package commits, MERGEs and time-travels
  without JVM jars. A Spark DataFrame handed to it is first written as Parquet by the executors into a
  staging folder; delta-rs then streams those files in bounded Arrow batches into its commit, so the driver
  never holds a whole table. Spark reads a table through Spark's Delta reader when the session has the jars.
- `SparkDelta` (`delta.backend: delta-spark`): `format("delta")` and MERGE run in Spark, on the executors.
  Its jars are resolved by the set-up (`python -m llmfeat.delta_jars`); without them it stops at start and
  says how to add them.

`data` is a Spark DataFrame (the jobs), or a pyarrow Table or pandas DataFrame (small tables). Every write is
one Delta commit: a failed write leaves the previous version current. `upsert` MERGEs by key and commits
nothing when no row changed, so re-runs never duplicate rows nor add empty versions. On delta-rs, an upsert
of a Spark DataFrame that mirrors it (delete_missing, every column compared) is decided on the executors and,
when something changed, committed as their files replacing the table's: no row through the driver.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from llmfeat.config import MIN_RETENTION_HOURS
from llmfeat.delta_jars import maven_coordinate
from llmfeat.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.config import Settings

STAGING = ".staging"  # under the Delta root: Parquet the executors wrote, until delta-rs committed it
BATCH_ROWS = 16_384  # rows per Arrow batch streamed from the staging files into a delta-rs commit
# Rows per Parquet row group delta-rs writes. Its writer holds a row group in memory until it is full, and
# its default (about a million rows) made a write of vector rows hold ~1 GB in the driver at 10x ML-100k.
ROW_GROUP_ROWS = 65_536
# A scan decodes one batch ahead: Arrow's default (16 batches of each of 4 files) held ~1 GB of vector rows.
ONE_AHEAD = {"batch_readahead": 1, "fragment_readahead": 1}


@dataclass
class Maintained:
    """A table after `maintain`: files of the current version before and after compaction, files vacuumed."""

    table: str
    files_before: int
    files_after: int
    vacuumed: int
    version: int

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.files_before} -> {self.files_after} files, {self.vacuumed} old files "
            f"vacuumed, version {self.version}"
        )


class DeltaTables(Protocol):
    root: Path

    def path(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...
    def version(self, name: str) -> int | None: ...
    def write(self, name: str, data: Any, mode: str = "overwrite") -> int: ...
    def append(self, name: str, data: pa.Table) -> int: ...
    def upsert(
        self,
        name: str,
        data: Any,
        keys: list[str],
        delete_missing: bool = False,
        compare: list[str] | None = None,
    ) -> int: ...
    def delete_keys(self, name: str, data: Any, keys: list[str]) -> int: ...
    def read_spark(self, name: str, version: int | None = None) -> DataFrame: ...
    def read_arrow(self, name: str, version: int | None = None) -> pa.Table: ...
    def history(self, name: str) -> list[dict[str, Any]]: ...
    def maintain(self, name: str, retention_hours: int = MIN_RETENTION_HOURS) -> Maintained: ...


def merge_predicates(
    keys: list[str], columns: list[str], compare: list[str] | None, dialect: str
) -> tuple[str, str]:
    """(match on keys, some compared column differs) as SQL over aliases t and s; nulls compare equal.

    `dialect` is "datafusion" (delta-rs) or "spark"; identifiers are quoted (`text` is a keyword there).
    """
    q = "`" if dialect == "spark" else '"'
    on = " AND ".join(f"t.{q}{k}{q} = s.{q}{k}{q}" for k in keys)
    cols = compare if compare is not None else [c for c in columns if c not in keys]
    if dialect == "spark":
        changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in cols)
    else:
        changed = " OR ".join(f'(t."{c}" IS DISTINCT FROM s."{c}")' for c in cols)
    return on, changed or "false"


def check_retention(retention_hours: int) -> None:
    """Vacuum never removes what time travel still promises (every version of the last 7 days)."""
    if retention_hours < MIN_RETENTION_HOURS:
        raise ValueError(
            f"retention of {retention_hours} h is below {MIN_RETENTION_HOURS} h: every table version of the "
            f"last {MIN_RETENTION_HOURS // 24} days stays readable (delta.retention_hours)"
        )


class RustDelta:
    """delta-rs backend. `spark` is needed to take Spark DataFrames and to hand tables to Spark jobs."""

    def __init__(self, root: str | Path, spark: SparkSession | None = None):
        self.root = Path(root)
        self.spark = spark
        self._appenders: dict[str, Any] = {}  # name -> DeltaTable kept for `append`

    def path(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return (self.root / name / "_delta_log").is_dir()

    def _table(self, name: str, version: int | None = None) -> Any:
        from deltalake import DeltaTable

        if not self.exists(name):
            raise FileNotFoundError(f"Delta table {name!r} not found at {self.path(name)}")
        return DeltaTable(self.path(name), version=version)

    def version(self, name: str) -> int | None:
        return self._table(name).version() if self.exists(name) else None

    @contextmanager
    def _source(self, data: Any) -> Iterator[pa.Table | pa.RecordBatchReader]:
        """`data` as delta-rs reads it: an Arrow table as is; a Spark DataFrame written by the executors into
        a staging folder, then streamed in batches of BATCH_ROWS (the folder is removed afterwards)."""
        if not is_spark_frame(data):
            yield _arrow(data)
            return
        staging = self.root / STAGING / uuid.uuid4().hex
        try:
            data.write.mode("overwrite").parquet(str(staging))
            yield staged_reader(staging, arrow_schema(data))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write(self, name: str, data: Any, mode: str = "overwrite") -> int:
        from deltalake import write_deltalake

        if is_spark_frame(data):
            return self._commit_executor_files(name, data, mode)
        with self._source(data) as source:
            if mode == "overwrite":
                write_deltalake(
                    self.path(name),
                    source,
                    mode="overwrite",
                    schema_mode="overwrite",
                    writer_properties=_props(),
                )
            else:
                write_deltalake(self.path(name), source, mode="append", writer_properties=_props())
        return self._table(name).version()

    def _commit_executor_files(self, name: str, frame: DataFrame, mode: str) -> int:
        """A Spark DataFrame written or appended with no row through the driver: the executors write its
        Parquet files into a folder of the table, and the driver commits them as add actions (each with its
        row count, read from the file's footer); an overwrite removes the files of the version before. A
        failed write leaves the table as it was (the folder is removed; nothing refers to it)."""
        import pyarrow.parquet as pq
        from deltalake import Schema
        from deltalake.transaction import AddAction, create_table_with_add_actions

        part = f"spark-{uuid.uuid4().hex}"
        folder = self.root / name / part
        schema = Schema.from_arrow(arrow_schema(frame))
        try:
            frame.write.mode("overwrite").parquet(str(folder))
            actions = []
            for f in sorted(folder.glob("*.parquet")):
                stat, rows = f.stat(), pq.ParquetFile(f).metadata.num_rows
                stats = json.dumps({"numRecords": rows})
                actions.append(
                    AddAction(f"{part}/{f.name}", stat.st_size, {}, int(stat.st_mtime * 1000), True, stats)
                )
            if self.exists(name):
                self._table(name).create_write_transaction(actions, mode=mode, schema=schema)
            else:
                create_table_with_add_actions(self.path(name), schema, actions, mode="overwrite")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self._table(name).version()

    def append(self, name: str, data: pa.Table) -> int:
        """Append through a table handle kept for the next append (a process that appends often: the event
        sink). Opening a table by path replays its log, holding the GIL: on a table of ~2,000 commits that
        stalled the threads beside it for ~25 ms per append; the handle reads only what was committed
        since."""
        from deltalake import write_deltalake

        table = self._appenders.get(name)
        if table is None:
            if not self.exists(name):
                return self.write(name, data, mode="append")
            table = self._appenders[name] = self._table(name)
        write_deltalake(table, data, mode="append", writer_properties=_props())
        return int(table.version())

    def upsert(
        self,
        name: str,
        data: Any,
        keys: list[str],
        delete_missing: bool = False,
        compare: list[str] | None = None,
    ) -> int:
        if not self.exists(name):
            return self.write(name, data)
        if delete_missing and compare is None and is_spark_frame(data):
            mirrored = self._mirror(name, data, keys)
            if mirrored is not None:
                return mirrored
        target = self._table(name)
        with self._source(data) as source:
            # Columns new to the table: added by schema evolution, and every matched row counts as changed.
            names = source.schema.names
            known = set(target.schema().to_arrow().names)
            new_cols = [c for c in names if c not in known]
            on, changed = merge_predicates(keys, names, compare, "datafusion")
            if new_cols:
                changed = "true"
            merge = target.merge(
                source,
                predicate=on,
                source_alias="s",
                target_alias="t",
                merge_schema=bool(new_cols),
                writer_properties=_props(),
            )
            merge = merge.when_matched_update_all(predicate=changed).when_not_matched_insert_all()
            if delete_missing:
                merge = merge.when_not_matched_by_source_delete()
            merge.execute()  # commits nothing when no row changed
        return self._table(name).version()

    def _mirror(self, name: str, frame: DataFrame, keys: list[str]) -> int | None:
        """An upsert with delete_missing and every column compared leaves the table equal to `frame`: whether
        it changes anything is decided on the executors, and if it does, the executors' files replace the
        table's in one overwrite commit. No row passes the driver, where delta-rs's MERGE holds its whole
        source (the state job's at 10x ML-100k: 1.5 GB). None: the columns differ from the table's (schema
        evolution), left to the MERGE."""
        target = self.read_spark(name)
        if sorted(target.columns) != sorted(frame.columns):
            return None
        with computed_once(frame) as frame:  # for the check and the write
            on, changed = merge_predicates(keys, frame.columns, None, "spark")
            if not would_change(target, frame, keys, on, changed, delete_missing=True):
                return self.version(name)
            return self._commit_executor_files(name, frame, "overwrite")

    def delete_keys(self, name: str, data: Any, keys: list[str]) -> int:
        """Delete the rows whose `keys` match a row of `data` (one commit; none when nothing matched)."""
        if not self.exists(name):
            return -1
        with self._source(data) as source:
            on, _ = merge_predicates(keys, keys, [], "datafusion")
            merge = self._table(name).merge(
                source, predicate=on, source_alias="s", target_alias="t", writer_properties=_props()
            )
            merge.when_matched_delete().execute()
        return self._table(name).version()

    def read_arrow(self, name: str, version: int | None = None) -> pa.Table:
        return self._table(name, version).to_pyarrow_table()

    def read_spark(self, name: str, version: int | None = None) -> DataFrame:
        """The table (or a pinned version) as a Spark DataFrame, read on the executors.

        With the Delta jars in the session: Spark's Delta reader (deletion vectors, column mapping and
        partitions handled by Delta). Without them: the version's Parquet files when they are the table
        exactly (reader protocol 1: no deletion vectors, no column mapping; no partition columns), else a
        copy of that version written once in bounded batches by delta-rs under .staging/ and read from there.
        """
        if self.spark is None:
            raise RuntimeError("RustDelta.read_spark needs the SparkSession it was built with")
        table = self._table(name, version)
        if has_delta_jars(self.spark):
            return (
                self.spark.read.format("delta").option("versionAsOf", table.version()).load(self.path(name))
            )
        uris = table.file_uris()
        if not uris:  # an empty snapshot has no files; keep its schema
            return self.spark.createDataFrame(table.to_pyarrow_table())
        if table.protocol().min_reader_version == 1 and not table.metadata().partition_columns:
            return self.spark.read.parquet(*uris)
        return self.spark.read.parquet(str(self._snapshot_copy(name, table)))

    def _snapshot_copy(self, name: str, table: Any) -> Path:
        """One version of a table that plain Parquet readers cannot read right, as Parquet files under
        .staging/<name>-v<version> (a version never changes: written once, removed by `maintain`)."""
        import pyarrow.parquet as pq
        from deltalake import QueryBuilder

        folder = self.root / STAGING / f"{name}-v{table.version()}"
        if (folder / "_SUCCESS").exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        batches = pa.RecordBatchReader.from_stream(
            QueryBuilder().register("t", table).execute("SELECT * FROM t")
        )
        with pq.ParquetWriter(folder / "part-00000.parquet", batches.schema) as writer:
            for batch in batches:  # delta-rs applies deletion vectors and column mapping
                writer.write_batch(batch)
        (folder / "_SUCCESS").touch()
        return folder

    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._table(name).history())

    def maintain(self, name: str, retention_hours: int = MIN_RETENTION_HOURS) -> Maintained:
        """Compact small files into larger ones (a new version with the same rows), then vacuum the files no
        version of the last `retention_hours` needs."""
        check_retention(retention_hours)
        before = len(self._table(name).file_uris())
        self._table(name).optimize.compact()
        table = self._table(name)
        # check_retention is the rule here, whatever a table's own deletedFileRetentionDuration says.
        gone = table.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)
        for copy in (self.root / STAGING).glob(f"{name}-v*"):
            shutil.rmtree(copy, ignore_errors=True)
        return Maintained(name, before, len(table.file_uris()), len(gone), table.version())


class SparkDelta:
    """JVM delta-spark backend: format("delta") reads and writes, MERGE INTO through the DeltaTable API, all
    on the executors. A pyarrow or pandas table becomes a Spark DataFrame directly (small tables only)."""

    def __init__(self, root: str | Path, spark: SparkSession):
        self.root = Path(root)
        self.spark = spark
        check_delta_jars(spark)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return (self.root / name / "_delta_log").is_dir()

    def _api(self, name: str) -> Any:
        from delta.tables import DeltaTable

        return DeltaTable.forPath(self.spark, self.path(name))

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        return int(self._api(name).history(1).select("version").head()[0])

    def _frame(self, data: Any) -> DataFrame:
        return data if is_spark_frame(data) else self.spark.createDataFrame(data)

    def write(self, name: str, data: Any, mode: str = "overwrite") -> int:
        writer = self._frame(data).write.format("delta").mode(mode)
        writer = writer.option("overwriteSchema", "true") if mode == "overwrite" else writer
        writer.save(self.path(name))
        return self.version(name) or 0

    def append(self, name: str, data: pa.Table) -> int:
        return self.write(name, data, mode="append")

    def upsert(
        self,
        name: str,
        data: Any,
        keys: list[str],
        delete_missing: bool = False,
        compare: list[str] | None = None,
    ) -> int:
        frame = self._frame(data)
        if not self.exists(name):
            return self.write(name, frame)
        target = self._api(name)
        new_cols = set(frame.columns) - set(target.toDF().columns)
        on, changed = merge_predicates(keys, frame.columns, compare, "spark")
        changed = "true" if new_cols else changed  # added by schema evolution: every matched row changes
        with computed_once(frame) as frame:  # for the check and the MERGE
            # Delta's MERGE commits a version even when no row changes: it runs only when one would.
            if not would_change(target.toDF(), frame, keys, on, changed, delete_missing):
                return self.version(name) or 0
            merge = target.alias("t").merge(frame.alias("s"), on)
            merge = merge.withSchemaEvolution() if new_cols else merge
            merge = merge.whenMatchedUpdateAll(condition=changed).whenNotMatchedInsertAll()
            if delete_missing:
                merge = merge.whenNotMatchedBySourceDelete()
            merge.execute()
        return self.version(name) or 0

    def delete_keys(self, name: str, data: Any, keys: list[str]) -> int:
        """Delete the rows whose `keys` match a row of `data` (a MERGE in Spark)."""
        if not self.exists(name):
            return -1
        on, _ = merge_predicates(keys, keys, [], "spark")
        self._api(name).alias("t").merge(self._frame(data).alias("s"), on).whenMatchedDelete().execute()
        return self.version(name) or 0

    def read_spark(self, name: str, version: int | None = None) -> DataFrame:
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(name))

    def read_arrow(self, name: str, version: int | None = None) -> pa.Table:
        """The whole table on the driver: for small tables only (the jobs read with read_spark)."""
        return self.read_spark(name, version).toArrow()

    def history(self, name: str) -> list[dict[str, Any]]:
        return [row.asDict() for row in self._api(name).history().collect()]

    def maintain(self, name: str, retention_hours: int = MIN_RETENTION_HOURS) -> Maintained:
        """OPTIMIZE (compaction) and VACUUM in Spark; see RustDelta.maintain."""
        check_retention(retention_hours)
        files = lambda: int(self._api(name).detail().select("numFiles").head()[0])  # noqa: E731
        before = files()
        self._api(name).optimize().executeCompaction()
        written = len(data_files(self.path(name)))
        self._api(name).vacuum(float(retention_hours))
        gone = written - len(data_files(self.path(name)))
        return Maintained(name, before, files(), gone, self.version(name) or 0)


@contextmanager
def computed_once(frame: DataFrame) -> Iterator[DataFrame]:
    """`frame` persisted for the block, unless its caller already persisted it (then its cache is the
    caller's to keep: unpersisting it here would make the caller's next action compute it again)."""
    level = frame.storageLevel
    if level.useMemory or level.useDisk:
        yield frame
        return
    frame = frame.persist()
    try:
        yield frame
    finally:
        frame.unpersist()


def would_change(
    target: DataFrame, frame: DataFrame, keys: list[str], on: str, changed: str, delete_missing: bool
) -> bool:
    """Whether a MERGE of `frame` into `target` would insert, update or (with delete_missing) delete a row:
    small Spark jobs on the executors, one row at most to the driver."""
    from pyspark.sql import functions as F

    t, s = target.alias("t"), frame.alias("s")
    first_key = F.col(f"t.`{keys[0]}`")
    upserts = s.join(t, F.expr(on), "left").where(first_key.isNull() | F.expr(changed))
    if upserts.limit(1).count():
        return True
    return delete_missing and bool(t.join(s, F.expr(on), "left_anti").limit(1).count())


def data_files(path: str) -> list[Path]:
    """The Parquet files in a table's folder (current and old versions', not the log)."""
    return [p for p in Path(path).rglob("*.parquet") if "_delta_log" not in p.parts]


def has_delta_jars(spark: SparkSession) -> bool:
    """Whether the session's JVM can load delta-spark (the class loader py4j uses sees spark.jars)."""
    from py4j.java_gateway import JavaClass  # type: ignore[import-untyped]

    try:
        return isinstance(spark.sparkContext._jvm.io.delta.tables.DeltaTable, JavaClass)  # type: ignore[union-attr]
    except Exception:
        return False


def check_delta_jars(spark: SparkSession) -> None:
    if not has_delta_jars(spark):
        raise RuntimeError(
            "delta.backend is delta-spark but the Delta jars are not on Spark's classpath. Run `make setup` "
            f"(Maven resolves {maven_coordinate()} into the environment, the session lists the jars), or "
            f"pass them yourself: --packages {maven_coordinate()} (or spark.jars to local jars) with "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension and "
            "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog; "
            "or use delta.backend: delta-rs, which needs no jars"
        )


def is_spark_frame(data: Any) -> bool:
    from pyspark.sql import DataFrame

    return isinstance(data, DataFrame)


def arrow_schema(frame: DataFrame) -> pa.Schema:
    """The Arrow schema `frame.toArrow()` would give (UTC timestamps, Spark's list field names)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    large = frame.sparkSession._jconf.arrowUseLargeVarTypes()  # type: ignore[attr-defined]
    return to_arrow_schema(
        frame.schema, error_on_duplicated_field_names_in_struct=True, prefers_large_types=large
    )


def staged_reader(folder: Path, schema: pa.Schema) -> pa.RecordBatchReader:
    """The Parquet files Spark wrote into `folder`, as a stream of batches of at most BATCH_ROWS rows."""
    import pyarrow.dataset as ds

    files = ds.dataset(str(folder), format="parquet")  # skips _SUCCESS and .crc files

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in files.to_batches(columns=schema.names, batch_size=BATCH_ROWS, **ONE_AHEAD):
            yield batch.cast(schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def _props() -> Any:
    from deltalake import WriterProperties

    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS)


def _arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    return pa.Table.from_pandas(data, preserve_index=False)


def version_files(tables: DeltaTables, name: str, version: int | None = None) -> list[str]:
    """The data files (paths or URIs) of a table's version, for readers that know Parquet but not Delta; a
    UserError where the files are not the table as they are (deletion vectors or column mapping: reader
    protocol above 1; partition columns, whose values live in the log)."""
    from deltalake import DeltaTable

    table = DeltaTable(tables.path(name), version=version)
    if table.protocol().min_reader_version > 1 or table.metadata().partition_columns:
        raise UserError(
            f"Delta table {name} (version {table.version()}) uses deletion vectors, column mapping or "
            "partition columns: its Parquet files are not its rows; rewrite it without them to stream it"
        )
    return list(table.file_uris())


def open_tables(settings: Settings, spark: SparkSession | None = None) -> DeltaTables:
    """The backend named in config, rooted at <data_dir>/delta. A job that runs without Spark (torch on a
    sample, an evaluation) reads and writes the same tables with delta-rs, whatever the backend."""
    if settings.delta.backend == "delta-spark" and spark is not None:
        return SparkDelta(settings.delta_root, spark)
    return RustDelta(settings.delta_root, spark)


def table_names(root: Path) -> list[str]:
    """The Delta tables directly under `root`."""
    return sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir()) if root.is_dir() else []


def maintain_tables(
    tables: DeltaTables, retention_hours: int, names: list[str] | None = None
) -> list[Maintained]:
    """Compact and vacuum every table under the root (or `names`), checking the retention before any; remove
    staging folders a failed write left (Spark tasks of a failed job may still write after it failed)."""
    check_retention(retention_hours)
    done = [tables.maintain(n, retention_hours) for n in names or table_names(tables.root)]
    for folder in (tables.root / STAGING).glob("*"):
        if len(folder.name) == 32 and time.time() - folder.stat().st_mtime > 3600:  # a write's, an hour old
            shutil.rmtree(folder, ignore_errors=True)
    return done


def tables_summary(settings: Settings) -> str:
    """Every Delta table under data_dir with its current version and row count (no Spark needed)."""
    root = settings.delta_root
    names = table_names(root)
    if not names:
        return f"no Delta tables under {root} yet: run `llmfeat ingest`"
    tables = RustDelta(root)
    lines = [f"Delta tables under {root}", f"{'table':<16}{'rows':>9}{'version':>9}"]
    for n in names:
        t = tables._table(n)
        rows = count_rows(t)
        lines.append(f"{n:<16}{rows:>9,}{t.version():>9}")
    return "\n".join(lines)


def count_rows(table: Any) -> int:
    """Rows of a delta-rs table's version (deletion vectors applied)."""
    from deltalake import QueryBuilder

    counted = QueryBuilder().register("t", table).execute("SELECT COUNT(*) AS n FROM t")
    return int(pa.RecordBatchReader.from_stream(counted).read_all()["n"][0].as_py())
