"""Materialize job: feature tables in Delta -> Feast-facing tables -> Feast online store.

    spark-submit spark_jobs/materialize.py --config conf/local.yaml [--set key=value ...] [--full]
    llmfeat features materialize [--profile local] [--full]

1. Publish (the only place float16/int8 become float32): each compressed table (<side>_marc_v<N>_features
   of every MARC compressor version the repository declares, user_bahe_features, behavior_features) is
   decoded into a `feast_*` Delta table with an Array(Float32) column of the dimension the feature view
   declares; an older compressor version's tables keep being published and materialized next to the newest.
   A wrong dimension, a null or a non-finite vector stops the job before anything is written or
   materialized. Lineage columns are copied as they are.
   Item metadata and daily cumulative counters are derived from items and interactions.
   Every table then passes its great-expectations gate (validation/) before the first write.
2. Apply the repo (feature_repo/ under this profile's feature_store.yaml).
3. Materialize: incremental from the last materialized end time; a view never materialized, a static view and
   `--full` take the whole history. Tables that do not exist yet (compress not run) are skipped, with a note.
4. The fresh state views (user_state_*_fv, item_state_fv; written by `llmfeat user-state`): each entity's
   newest row goes to the online store unless the state there already holds that event or a later one (a
   state pushed by POST /events or `llmfeat push` since the batch run), so a refresh never clobbers a newer
   pushed state (serving/state_store.py `write_newer`).

Steps 1 and 2 run on the executors: the Feast-facing tables stay Spark frames from read to MERGE, and only
counts and example keys reach the driver. Step 3 is Feast's: with the embedded default (file offline store,
local engine) this process reads each view's window in bounded batches and keeps each entity's newest row
(llmfeat/feast_delta.py); `feast.batch_engine: spark` (with the Spark offline store) materializes on the
executors instead (docs/scale.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import Settings, ValidationConf
from llmfeat.errors import UserError
from llmfeat.reprs import FEATURE_LINEAGE, MarcView, marc_views_in
from llmfeat.reprs import decode_vectors as decode_stored

if TYPE_CHECKING:
    from collections.abc import Iterable

    from feast import FeatureStore, FeatureView
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables
    from llmfeat.validation.suites import Suite

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIMESTAMP = pa.timestamp("us", tz="UTC")
DEFAULTS = ValidationConf()


class FeatureTableError(UserError, ValueError):
    """A feature table that must not be served: names the table, the problem and example keys."""


@dataclass(frozen=True)
class VectorTable:
    source: str  # the compress job's Delta table
    key: str
    target: str  # the Feast-facing Delta table (data_sources.py)
    column: str  # the vector field in the feature view
    view: str
    times: str = ""  # prefix of the lineage time fields (<p>valid_from, <p>history_until); "" = none
    compressor_version: str | None = None  # a table of one MARC compressor version holds its rows only

    @classmethod
    def marc(cls, view: MarcView) -> VectorTable:
        """One MARC compressor version's tables, e.g. user_marc_v1_features -> feast_user_marc_v1."""
        side = view.side
        tables = (view.features_table, view.key, view.feast_table)
        return cls(*tables, f"{side}_vector", view.name, f"{side}_", view.version)


# One Feast-facing table and view per representation, and for MARC per compressor version: two encoders,
# layers or compressors never share one.
BAHE_TABLES = (
    VectorTable("user_bahe_features", "user_id", "feast_user_bahe", "user_vector", "user_bahe_fv"),
    VectorTable(
        "behavior_features", "behavior_id", "feast_behavior_llm", "behavior_vector", "behavior_llm_fv"
    ),
)


def vector_tables(views: Iterable[str]) -> list[VectorTable]:
    """The vector tables of these declared views: one pair per MARC compressor version, then BAHE's."""
    return [*(VectorTable.marc(m) for m in marc_views_in(views)), *BAHE_TABLES]


STATIC_VIEWS = {"item_meta_fv"}  # stamped at the epoch: always materialized in full


@dataclass(frozen=True)
class Published:
    table: str
    view: str
    rows: int
    version: int
    note: str = ""


def _examples(table: pa.Table, key: str, mask: pa.Array) -> list[str]:
    return [str(k) for k in table.filter(mask)[key].to_pylist()[:3]]


def decode_vectors(table: pa.Table, spec: VectorTable, dim: int) -> pa.Table:
    """Compressed rows -> Feast rows: key, <column> list<float32>[dim], event_timestamp, lineage.

    float16 is widened; int8 is multiplied by the row's float32 `scale`. Raises FeatureTableError on a wrong
    length, a null or a non-finite value, naming the table and example keys.
    """
    for col in (spec.key, "vector", "event_timestamp"):
        if col not in table.column_names:
            raise FeatureTableError(f"{spec.source}: missing column {col!r}; found {table.column_names}")
    vectors = table["vector"].combine_chunks()
    null = pc.is_null(vectors)
    if pc.any(null).as_py():
        raise FeatureTableError(
            f"{spec.source}: null vector for {spec.key} {_examples(table, spec.key, null)}"
        )
    wrong = pc.not_equal(pc.list_value_length(vectors), dim)
    if pc.any(wrong).as_py():
        got = sorted(set(pc.list_value_length(vectors).filter(wrong).to_pylist()))[:3]
        raise FeatureTableError(
            f"{spec.source}: vector length {got} but {spec.view} declares {dim} "
            f"(feature_repo/feature_views.py VECTOR_DIM); e.g. {spec.key} {_examples(table, spec.key, wrong)}"
        )
    if pa.types.is_int8(vectors.type.value_type) and "scale" not in table.column_names:
        raise FeatureTableError(f"{spec.source}: int8 vectors need a float32 `scale` column")
    scale = table["scale"].combine_chunks() if "scale" in table.column_names else None
    values = decode_stored(vectors, scale, dim)  # [B, D] float32
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise FeatureTableError(
            f"{spec.source}: non-finite vector for {spec.key} {_examples(table, spec.key, pa.array(bad))}"
        )
    flat = pa.array(values.reshape(-1), type=pa.float32())
    columns = {
        spec.key: table[spec.key].cast(pa.string()),
        spec.column: pa.ListArray.from_arrays(
            pa.array(np.arange(0, len(flat) + 1, dim, dtype=np.int32)), flat
        ),
        "event_timestamp": table["event_timestamp"].cast(TIMESTAMP),
    }
    for name, type_ in FEATURE_LINEAGE.items():
        present = name in table.column_names
        columns[name] = table[name].cast(type_) if present else pa.nulls(table.num_rows, type_)
    if spec.times:
        columns[f"{spec.times}valid_from"] = columns["event_timestamp"]
        if spec.key == "user_id":
            until = "history_until" in table.column_names
            columns[f"{spec.times}history_until"] = (
                table["history_until"].cast(TIMESTAMP) if until else pa.nulls(table.num_rows, TIMESTAMP)
            )
    return pa.table(columns)


def item_meta(items: pa.Table) -> pa.Table:
    """Static metadata, valid since the epoch so that every historical interaction can join it."""
    return pa.table(
        {
            "item_id": items["item_id"].cast(pa.string()),
            "title": items["title"].cast(pa.string()),
            "year": items["year"].cast(pa.int64()),
            "genres": items["genres"].cast(pa.string()),
            "event_timestamp": pa.array([EPOCH] * items.num_rows, type=TIMESTAMP),
        }
    )


def daily_counters(interactions: DataFrame, key: str, prefix: str) -> DataFrame:
    """Cumulative impressions and clicks per key, one row per active day, stamped at the next midnight (UTC):
    a row holds only interactions strictly before its timestamp, so a point-in-time join cannot leak."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    day = F.date_trunc("day", F.col("event_timestamp")).alias("day")
    daily = interactions.groupBy(key, day).agg(F.count("*").alias("n"), F.sum("label").alias("c"))
    upto = Window.partitionBy(key).orderBy("day").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    return daily.select(
        F.col(key).cast("string").alias(key),
        (F.col("day") + F.expr("INTERVAL 1 DAY")).alias("event_timestamp"),
        F.sum("n").over(upto).cast("long").alias(f"{prefix}_impressions"),
        F.sum("c").over(upto).cast("long").alias(f"{prefix}_clicks"),
    )


@dataclass(frozen=True)
class Staged:
    """A Feast-facing table computed, not yet written: a Spark frame (or an Arrow table without a session)."""

    table: str
    view: str
    data: Any
    keys: list[str]
    dim: int = 0  # vector tables: the dimension the view declares
    compare: list[str] | None = None  # None: every non-key column
    history: bool = False  # True: rows are only added or updated (vectors); False: mirrors its source


def publish(
    spark: SparkSession | None, tables: DeltaTables, conf: ValidationConf = DEFAULTS
) -> list[Published]:
    """Write every Feast-facing table whose input exists; all checks and every table's great-expectations
    gate run before the first write. With a session the tables stay Spark frames on the executors, cached for
    the gate and the MERGE; without one (small lakes, tools) they are Arrow tables in this process, and the
    counters, which aggregate interactions, are left out."""
    from llmfeat.validation.gating import gate, new_run_id

    staged, skipped = stage_spark(spark, tables) if spark is not None else stage_arrow(tables)
    try:
        run_id = new_run_id("materialize")
        for st in staged:
            suite = _suite(st.table, st.keys[0], st.dim, conf)
            gate(st.data, suite, table=st.table, tables=tables, run_id=run_id, conf=conf)
        out = []
        for st in staged:
            version = tables.upsert(
                st.table, st.data, st.keys, delete_missing=not st.history, compare=st.compare
            )
            rows = st.data.num_rows if isinstance(st.data, pa.Table) else st.data.count()
            out.append(Published(st.table, st.view, rows, version))
        return out + skipped
    finally:
        for st in staged:
            if not isinstance(st.data, pa.Table):
                st.data.unpersist()


def _vector_specs(tables: DeltaTables) -> tuple[list[tuple[VectorTable, int]], list[Published]]:
    """(spec, declared dimension) of each vector table whose source exists; a note for each that does not."""
    from llmfeat.feast_repo import feature_views, vector_dim

    views = feature_views()
    found, skipped = [], []
    for spec in vector_tables(views):
        if tables.exists(spec.source):
            found.append((spec, vector_dim(views[spec.view])))
        else:
            skipped.append(Published(spec.target, spec.view, 0, -1, f"no {spec.source} table yet"))
    return found, skipped


# Vector tables are keyed by (key, valid-from time) and never deleted from: a vector its source replaced (an
# item re-encoded) stays as history, so a training set joins the vector that was current at each interaction;
# the online store gets the latest. One table per representation (per compressor version) keeps them unmixed.


def stage_arrow(tables: DeltaTables) -> tuple[list[Staged], list[Published]]:
    """Without a session: vectors and item metadata as Arrow tables, read whole into this process."""
    specs, skipped = _vector_specs(tables)
    staged = [
        Staged(spec.target, spec.view, decode_vectors(tables.read_arrow(spec.source), spec, dim),
               [spec.key, "event_timestamp"], dim, [*FEATURE_LINEAGE], history=True)
        for spec, dim in specs
    ]  # fmt: skip
    if tables.exists("items"):
        staged.append(
            Staged("feast_item_meta", "item_meta_fv", item_meta(tables.read_arrow("items")), ["item_id"])
        )
    return staged, skipped


def stage_spark(spark: SparkSession, tables: DeltaTables) -> tuple[list[Staged], list[Published]]:
    """Every Feast-facing table as a Spark frame, checked (FeatureTableError) and cached on the executors."""
    from pyspark import StorageLevel

    specs, skipped = _vector_specs(tables)
    staged = []
    for spec, dim in specs:
        frame = decode_vectors_spark(tables.read_spark(spec.source), spec, dim)
        keys = [spec.key, "event_timestamp"]
        staged.append(Staged(spec.target, spec.view, frame, keys, dim, [*FEATURE_LINEAGE], history=True))
    if tables.exists("items"):
        meta = item_meta_spark(tables.read_spark("items"))
        staged.append(Staged("feast_item_meta", "item_meta_fv", meta, ["item_id"]))
    if tables.exists("interactions"):
        inter = tables.read_spark("interactions")
        for key, prefix in (("user_id", "user"), ("item_id", "item")):
            counts = daily_counters(inter, key, prefix)
            compare = [f"{prefix}_impressions", f"{prefix}_clicks"]
            staged.append(
                Staged(
                    f"feast_{prefix}_stats",
                    f"{prefix}_stats_fv",
                    counts,
                    [key, "event_timestamp"],
                    0,
                    compare,
                )
            )
    return [replace(st, data=st.data.persist(StorageLevel.MEMORY_AND_DISK)) for st in staged], skipped


def decode_vectors_spark(frame: DataFrame, spec: VectorTable, dim: int) -> DataFrame:
    """Spark twin of `decode_vectors`: the same checks and errors (on the executors; only example keys reach
    the driver), then the same rows, decoded batch by batch by `decode_vectors` itself (mapInArrow)."""
    from pyspark.sql import functions as F

    for col in (spec.key, "vector", "event_timestamp"):
        if col not in frame.columns:
            raise FeatureTableError(f"{spec.source}: missing column {col!r}; found {frame.columns}")
    vector_type: Any = frame.schema["vector"].dataType  # an ArrayType
    int8 = vector_type.elementType.typeName() == "byte"
    if int8 and "scale" not in frame.columns:
        raise FeatureTableError(f"{spec.source}: int8 vectors need a float32 `scale` column")

    def examples(bad: Any) -> list[str]:
        return [str(r[0]) for r in frame.where(bad).select(spec.key).limit(3).collect()]

    vector = F.col("vector")
    if null := examples(vector.isNull()):
        raise FeatureTableError(f"{spec.source}: null vector for {spec.key} {null}")
    wrong = F.size(vector) != dim
    if got := sorted(r[0] for r in frame.where(wrong).select(F.size(vector)).distinct().limit(3).collect()):
        raise FeatureTableError(
            f"{spec.source}: vector length {got} but {spec.view} declares {dim} "
            f"(feature_repo/feature_views.py VECTOR_DIM); e.g. {spec.key} {examples(wrong)}"
        )
    scale = F.col("scale").cast("float") if int8 else F.lit(1.0).cast("float")

    def value(x: Any) -> Any:  # float32 values, times the row's int8 scale
        return x.cast("float") * scale

    nonfinite = F.exists(vector, lambda x: F.isnan(value(x)) | (F.abs(value(x)) == float("inf")))
    if bad := examples(nonfinite | (scale.isNull() if int8 else F.lit(False))):
        raise FeatureTableError(f"{spec.source}: non-finite vector for {spec.key} {bad}")
    columns = [c for c in (spec.key, "vector", "scale", "event_timestamp", "history_until", *FEATURE_LINEAGE)
               if c in frame.columns]  # fmt: skip
    return frame.select(*columns).mapInArrow(ArrowDecoder(spec, dim), decoded_schema(spec))


@dataclass(frozen=True)
class ArrowDecoder:
    """mapInArrow body: `decode_vectors` on each batch (plain data, so Spark can ship it)."""

    spec: VectorTable
    dim: int

    def __call__(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows:
                yield from decode_vectors(pa.Table.from_batches([batch]), self.spec, self.dim).to_batches()


def decoded_schema(spec: VectorTable) -> str:
    """The Spark schema of `decode_vectors`' output."""
    spark_type = {pa.int64(): "bigint", pa.string(): "string"}
    cols = [f"`{spec.key}` string", f"`{spec.column}` array<float>", "event_timestamp timestamp"]
    cols += [f"`{name}` {spark_type[t]}" for name, t in FEATURE_LINEAGE.items()]
    if spec.times:
        cols.append(f"`{spec.times}valid_from` timestamp")
        if spec.key == "user_id":
            cols.append(f"`{spec.times}history_until` timestamp")
    return ", ".join(cols)


def item_meta_spark(items: DataFrame) -> DataFrame:
    """Spark twin of `item_meta`."""
    from pyspark.sql import functions as F

    return items.select(
        F.col("item_id").cast("string").alias("item_id"),
        F.col("title").cast("string").alias("title"),
        F.col("year").cast("bigint").alias("year"),
        F.col("genres").cast("string").alias("genres"),
        F.lit(EPOCH).cast("timestamp").alias("event_timestamp"),
    )


def _suite(table: str, key: str, dim: int, conf: ValidationConf) -> Suite:
    from llmfeat.validation.suites import counters_suite, feature_suite, item_meta_suite

    if table == "feast_item_meta":
        return item_meta_suite(conf)
    if table.endswith("_stats"):
        return counters_suite(table.removeprefix("feast_").removesuffix("_stats"), key, conf)
    from llmfeat.feast_repo import feature_views

    spec = next(v for v in vector_tables(feature_views()) if v.target == table)
    return feature_suite(
        table,
        key,
        dim,
        "float32",
        spec.column,
        conf=conf,
        stored_dtype=False,
        time_key=True,
        compressor_version=spec.compressor_version,
    )


def materialize(store: FeatureStore, views: list[str], full: bool = False) -> None:
    """Incremental per view; the whole history for a view never materialized, a static view, or `full`."""
    now = datetime.now(UTC)
    whole = [
        v
        for v in views
        if full or v in STATIC_VIEWS or store.get_feature_view(v).most_recent_end_time is None
    ]
    if whole:
        store.materialize(start_date=EPOCH, end_date=now, feature_views=whole)
    rest = [v for v in views if v not in whole]
    if rest:
        store.materialize_incremental(end_date=now, feature_views=rest)


def views_on(tables: list[str]) -> list[str]:
    """Every declared feature view reading one of these Feast-facing tables (vectors have a lineage twin)."""
    from llmfeat.feast_repo import feature_views

    names = set(tables)
    return [v.name for v in feature_views().values() if table_of(v) in names]


def table_of(view: FeatureView) -> str:
    source = view.batch_source
    return str(getattr(source, "path", "") or "").rsplit("/", 1)[-1] if source is not None else ""


def newest_rows(
    spark: SparkSession | None,
    tables: DeltaTables,
    table: str,
    key: str,
    batch_rows: int = 10_000,
    before: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Each key's newest row of a state table (stamped strictly `before`, when given: the state as of then):
    with a session ranked on the executors and streamed to the driver a partition at a time; without one,
    read in bounded batches (the dict holds one row per key, what the online store holds anyway)."""
    if spark is not None:
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        newest = Window.partitionBy(key).orderBy(F.col("event_timestamp").desc())
        rows = tables.read_spark(table)
        rows = rows if before is None else rows.where(F.col("event_timestamp") < F.lit(before))
        frame = rows.withColumn("_n", F.row_number().over(newest)).where("_n = 1")
        for row in frame.drop("_n").toLocalIterator(prefetchPartitions=True):
            yield row.asDict()
        return
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    from llmfeat.delta_io import ONE_AHEAD

    latest: dict[str, dict[str, Any]] = {}
    dataset = DeltaTable(tables.path(table)).to_pyarrow_dataset()
    wanted = None if before is None else ds.field("event_timestamp") < before
    for batch in dataset.to_batches(batch_size=batch_rows, filter=wanted, **ONE_AHEAD):
        for row in batch.to_pylist():
            held = latest.get(row[key])
            if held is None or row["event_timestamp"] > held["event_timestamp"]:
                latest[row[key]] = row
    yield from latest.values()


def materialize_state(
    spark: SparkSession | None,
    settings: Settings,
    tables: DeltaTables,
    store: FeatureStore,
    before: datetime | None = None,
) -> list[Published]:
    """Step 4: every declared state view whose table exists, newest row per entity, never over a newer one;
    with `before`, the state as of then (rows stamped strictly before it: a replay's start)."""
    from llmfeat.feast_repo import feature_views
    from llmfeat.serving.state_store import state_backend, write_newer

    out = []
    backend = None
    for view in feature_views().values():
        if view.tags.get("kind") != "state":
            continue
        table = table_of(view)
        if not tables.exists(table):
            out.append(Published(table, view.name, 0, -1, "no table yet: run `llmfeat user-state`"))
            continue
        backend = backend or state_backend(store, settings.feast.online_store)
        applied = store.get_feature_view(view.name)  # as applied: with the entity columns Feast inferred
        key = applied.entity_columns[0].name
        rows = newest_rows(spark, tables, table, key, before=before)
        written = write_newer(backend, applied, key, rows)
        end = before or datetime.now(UTC)
        store.registry.apply_materialization(applied, store.project, EPOCH, end, commit=True)
        version = tables.version(table)
        out.append(Published(table, view.name, written, -1 if version is None else version,
                             f"{written:,} states newer than the online ones written"))  # fmt: skip
    return out


def run(spark: SparkSession | None, settings: Settings, full: bool = False) -> list[Published]:
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import apply_repo

    tables = open_tables(settings, spark)
    published = publish(spark, tables, settings.validation)
    store = apply_repo(settings)
    materialize(store, views_on([p.table for p in published if p.version >= 0]), full=full)
    return published + materialize_state(spark, settings, tables, store)


def format_published(published: list[Published]) -> str:
    t = max([len("table"), *(len(p.table) for p in published)]) + 2  # columns as wide as the longest name
    v = max([len("feature view"), *(len(p.view) for p in published)]) + 2
    lines = [f"{'table':<{t}}{'feature view':<{v}}{'rows':>9}{'version':>9}  note"]
    for p in published:
        version = str(p.version) if p.version >= 0 else "-"
        lines.append(f"{p.table:<{t}}{p.view:<{v}}{p.rows:>9,}{version:>9}  {p.note or 'materialized'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="llmfeat features materialize")
    config_args(parser)
    parser.add_argument("--full", action="store_true", help="re-materialize the whole history of every view")
    args = parser.parse_args(argv)
    return run_with_session(
        "features materialize",
        args.config,
        args.overrides,
        lambda spark, settings: print(format_published(run(spark, settings, full=args.full))),
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.materialize import main as package_main

    sys.exit(package_main())
