"""Delta Lake I/O behind one small interface, with two backends that write ordinary Delta tables.

- `RustDelta` (default, `delta.backend: delta-rs`): the `deltalake` package commits, MERGEs and time-travels
  without JVM jars; Spark reads a pinned snapshot as the parquet files of that version.
- `SparkDelta` (`delta.backend: delta-spark`): `format("delta")` through the JVM, for clusters whose classpath
  holds io.delta:delta-spark. Without the jars it fails at start and says how to add them.

Every write is one Delta commit: a failed job leaves the previous version current. `upsert` MERGEs by key and
commits nothing when no row changed, so re-runs never duplicate rows nor add empty versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.config import Settings


class DeltaTables(Protocol):
    root: Path

    def path(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...
    def version(self, name: str) -> int | None: ...
    def write(self, name: str, data: Any, mode: str = "overwrite") -> int: ...
    def upsert(
        self,
        name: str,
        data: Any,
        keys: list[str],
        delete_missing: bool = False,
        compare: list[str] | None = None,
    ) -> int: ...
    def read_spark(self, name: str, version: int | None = None) -> DataFrame: ...
    def read_arrow(self, name: str, version: int | None = None) -> pa.Table: ...
    def history(self, name: str) -> list[dict[str, Any]]: ...


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


class RustDelta:
    """delta-rs backend. `spark` is needed only to hand tables to Spark jobs."""

    def __init__(self, root: str | Path, spark: SparkSession | None = None):
        self.root = Path(root)
        self.spark = spark

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

    def write(self, name: str, data: Any, mode: str = "overwrite") -> int:
        from deltalake import write_deltalake

        if mode == "overwrite":
            write_deltalake(self.path(name), _arrow(data), mode="overwrite", schema_mode="overwrite")
        else:
            write_deltalake(self.path(name), _arrow(data), mode="append")
        return self._table(name).version()

    def upsert(
        self,
        name: str,
        data: Any,
        keys: list[str],
        delete_missing: bool = False,
        compare: list[str] | None = None,
    ) -> int:
        table = _arrow(data)
        if not self.exists(name):
            return self.write(name, table)
        target = self._table(name)
        # Columns new to the table: added by schema evolution, and every matched row counts as changed.
        known = set(target.schema().to_arrow().names)
        new_cols = [c for c in table.column_names if c not in known]
        on, changed = merge_predicates(keys, table.column_names, compare, "datafusion")
        if new_cols:
            changed = "true"
        merge = target.merge(
            table, predicate=on, source_alias="s", target_alias="t", merge_schema=bool(new_cols)
        )
        merge = merge.when_matched_update_all(predicate=changed).when_not_matched_insert_all()
        if delete_missing:
            merge = merge.when_not_matched_by_source_delete()
        merge.execute()  # commits nothing when no row changed
        return self._table(name).version()

    def read_arrow(self, name: str, version: int | None = None) -> pa.Table:
        return self._table(name, version).to_pyarrow_table()

    def read_spark(self, name: str, version: int | None = None) -> DataFrame:
        if self.spark is None:
            raise RuntimeError("RustDelta.read_spark needs the SparkSession it was built with")
        table = self._table(name, version)
        uris = table.file_uris()
        if not uris:  # an empty snapshot has no files; keep its schema
            return self.spark.createDataFrame(table.to_pyarrow_table().to_pandas())
        # A pinned snapshot: exactly the files of this version (valid while deletion vectors are off).
        return self.spark.read.parquet(*uris)

    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._table(name).history())


class SparkDelta:
    """JVM delta-spark backend: format("delta") reads and writes, MERGE INTO through the DeltaTable API."""

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
        return int(self._api(name).history(1).collect()[0]["version"])

    def _frame(self, data: Any) -> DataFrame:
        return data if not isinstance(data, pa.Table) else self.spark.createDataFrame(data.to_pandas())

    def write(self, name: str, data: Any, mode: str = "overwrite") -> int:
        writer = self._frame(data).write.format("delta").mode(mode)
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        writer.save(self.path(name))
        return self.version(name) or 0

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
        on, changed = merge_predicates(keys, frame.columns, compare, "spark")
        merge = self._api(name).alias("t").merge(frame.alias("s"), on)
        merge = merge.whenMatchedUpdateAll(condition=changed).whenNotMatchedInsertAll()
        if delete_missing:
            merge = merge.whenNotMatchedBySourceDelete()
        merge.execute()
        return self.version(name) or 0

    def read_spark(self, name: str, version: int | None = None) -> DataFrame:
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(name))

    def read_arrow(self, name: str, version: int | None = None) -> pa.Table:
        return self.read_spark(name, version).toArrow()

    def history(self, name: str) -> list[dict[str, Any]]:
        return [row.asDict() for row in self._api(name).history().collect()]


def check_delta_jars(spark: SparkSession) -> None:
    jvm: Any = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
    except Exception:
        raise RuntimeError(
            "delta.backend is delta-spark but the Delta jars are not on Spark's classpath. Add them, e.g. "
            "--packages io.delta:delta-spark_2.13:<version matching Spark> (or spark.jars to local jars) "
            "with spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension and "
            "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog; "
            "or use delta.backend: delta-rs, which needs no jars"
        ) from None


def _arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "toArrow"):  # a Spark DataFrame: collected on the driver for delta-rs
        return data.toArrow()
    return pa.Table.from_pandas(data, preserve_index=False)


def open_tables(settings: Settings, spark: SparkSession | None = None) -> DeltaTables:
    """The backend named in config, rooted at <data_dir>/delta."""
    if settings.delta.backend == "delta-spark":
        if spark is None:
            raise RuntimeError("delta.backend delta-spark needs a SparkSession")
        return SparkDelta(settings.delta_root, spark)
    return RustDelta(settings.delta_root, spark)


def tables_summary(settings: Settings) -> str:
    """Every Delta table under data_dir with its current version and row count (no Spark needed)."""
    root = settings.delta_root
    names = sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir()) if root.is_dir() else []
    if not names:
        return f"no Delta tables under {root} yet: run `llmfeat ingest`"
    tables = RustDelta(root)
    lines = [f"Delta tables under {root}", f"{'table':<16}{'rows':>9}{'version':>9}"]
    for n in names:
        t = tables._table(n)
        rows = t.to_pyarrow_dataset().count_rows()
        lines.append(f"{n:<16}{rows:>9,}{t.version():>9}")
    return "\n".join(lines)
