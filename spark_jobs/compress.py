"""Compress job: `<entity>_repr` at the compressor's layer -> one feature table per compressor version.

    spark-submit spark_jobs/compress.py --entity users,items [--config local|PATH] [--set key=value ...]
    llmfeat compress [--entity items] [--set marc.alias=challenger] [--set marc.output_dtype=float16]

The compressor is loaded from the MLflow registry by alias (<registry_name>-<entity>@<alias>). Its registry
version N names the output: user snapshots -> user_marc_v<N>_features, items -> item_marc_v<N>_features, the
whole history compressed by that version, next to the tables of older versions (which stay, for the models
pinned to them); static users -> user_features. A version is published only when the Feast repository
declares its views (feature_repo/feature_views.py); else the job stops before any work, naming the line to
add. Output, one row
per key: key, vector (float16 values, or int8 codes with a per-row float32 `scale`: vector * scale ~ the
compressed vector), event_timestamp (when the source representation was encoded), and lineage: source_table,
source_version, encoder_id, weights_hash, pooling, layer, content_hash, compressor_name, compressor_version,
dtype. float16 values are stored as float32 numbers exactly representable in float16 (Delta has no half type).

Checks, all before anything is written (a failure leaves the feature table at its previous version):
the representation table holds the compressor's layer, from the encoder it was trained on; every key of the
entity table has a finite vector of the compressor's input width at that layer. Errors name the key and table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from llmfeat.config import Settings
from llmfeat.errors import UserError
from llmfeat.reprs import (
    PASSED_THROUGH,
    MarcView,
    entity_key,
    repr_table,
    snapshot_parts_columns,
    vector_rows,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables
    from llmfeat.registry import RegisteredCompressor

# user_snapshots (the point-in-time user series) is compressed by the users' compressor; users (one static
# vector per user) only when asked for by name.
COMPRESSIBLE = ("user_snapshots", "items", "users")
MARC_SIDES = {"user_snapshots": "user", "items": "item"}  # the entities published as MARC feature views
COMPRESSOR_OF = {"user_snapshots": "users", "items": "items", "users": "users"}
DEFAULT_ENTITIES = ("user_snapshots", "items")


class CompressError(UserError, ValueError):
    """Input the compressor must not be applied to: names the table, the key and what is wrong."""


@dataclass(frozen=True)
class CompressSummary:
    entity: str
    table: str
    rows: int
    version: int
    compressor: str
    layer: int
    dtype: str
    bytes_per_vector: int

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.rows:,} rows, version {self.version}, {self.compressor}, "
            f"layer {self.layer}, {self.dtype} ({self.bytes_per_vector} bytes per vector)"
        )


def check_lineage(reprs: DataFrame, name: str, reg: RegisteredCompressor, configured_layer: int) -> None:
    """The compressor's layer and encoder must be what the table holds (and what the config asks for)."""
    from pyspark.sql import functions as F

    if configured_layer != reg.layer:
        raise CompressError(
            f"marc.layer is {configured_layer} but {reg.name} version {reg.version} (@{reg.alias}) was "
            f"trained on layer {reg.layer}: set marc.layer={reg.layer} or register a compressor for "
            f"layer {configured_layer}"
        )
    layers = sorted(r["layer"] for r in reprs.select("layer").distinct().collect())
    if reg.layer not in layers:
        raise CompressError(
            f"{name} has no layer {reg.layer}, the layer {reg.name} version {reg.version} was trained on "
            f"(layers in {name}: {layers})"
        )
    at = reprs.where(F.col("layer") == reg.layer)
    encoders = sorted(r["encoder_id"] for r in at.select("encoder_id").distinct().collect())
    if encoders != [reg.encoder_id]:
        other = [e for e in encoders if e != reg.encoder_id]
        example = at.where(F.col("encoder_id") != reg.encoder_id).limit(1).collect()
        raise CompressError(
            f"{name} layer {reg.layer} was encoded by {other} (e.g. key {example[0][0]!r}) but {reg.name} "
            f"version {reg.version} was trained on encoder {reg.encoder_id!r}, layer {reg.layer}: re-encode "
            f"with that encoder or train a compressor on this one"
        )


def feature_table(entity: str, reg: RegisteredCompressor) -> str:
    """The table `entity` is compressed into by this compressor version (see the module docstring)."""
    side = MARC_SIDES.get(entity)
    return MarcView(side, reg.version).features_table if side else "user_features"


def check_declared(entity: str, reg: RegisteredCompressor) -> None:
    """A compressor version is published next to the older ones, into views the repository declares; never
    over an older version's table, whose models would then be served vectors of another space."""
    from llmfeat.feast_repo import feature_views
    from llmfeat.paths import feature_repo_dir

    side = MARC_SIDES.get(entity)
    view = MarcView(side, reg.version) if side else None
    if view is not None and view.name not in feature_views():
        raise CompressError(
            f"{reg.name} version {reg.version} (@{reg.alias}) has no feature view {view.name}: to publish it "
            f"next to the older versions, add `{view.declaration}` to "
            f"{feature_repo_dir() / 'feature_views.py'} (and a feature service naming it), or compress with "
            f"an alias whose version is declared"
        )


def check_rows(at: DataFrame, keys: DataFrame, key: str, name: str, layer: int, in_dim: int) -> None:
    """Every key has one finite vector of width in_dim at `layer`; the first offending key is named."""
    from pyspark.sql import functions as F

    missing = keys.join(at.select(key), key, "left_anti")
    n_missing = missing.count()
    if n_missing:
        first = missing.orderBy(key).first()
        example = first[key] if first is not None else "?"
        raise CompressError(
            f"{name}: {key}={example!r} has no layer-{layer} vector ({n_missing} key(s) missing); "
            f"run `llmfeat encode` for them first"
        )
    wrong = at.where(F.col("vector").isNull() | (F.size("vector") != in_dim))
    bad = wrong.select(key, F.size("vector").alias("n")).orderBy(key).first()
    if bad is not None:
        raise CompressError(
            f"{name}: {key}={bad[key]!r} layer {layer}: vector has {bad['n']} values, "
            f"the compressor expects {in_dim}"
        )
    nonfinite = F.exists("vector", lambda x: F.isnan(x) | (F.abs(x) == float("inf")) | x.isNull())
    bad = at.where(nonfinite).select(key).orderBy(key).first()
    if bad is not None:
        raise CompressError(f"{name}: {key}={bad[key]!r} layer {layer}: NaN or inf in the vector")
    dup = at.groupBy(key).count().where("count > 1").orderBy(key).first()
    if dup is not None:
        raise CompressError(f"{name}: {key}={dup[key]!r} has {dup['count']} rows at layer {layer}")


_WORKER_MODELS: dict[str, Any] = {}


def worker_compressor(model_uri: str, registry_uri: str) -> Any:
    """One load per Python worker, from the registry (the exported program does not pickle)."""
    if model_uri not in _WORKER_MODELS:
        import mlflow

        mlflow.set_registry_uri(registry_uri)
        mlflow.set_tracking_uri(registry_uri)
        _WORKER_MODELS.clear()
        _WORKER_MODELS[model_uri] = mlflow.pytorch.load_model(model_uri)
    return _WORKER_MODELS[model_uri]


@dataclass(frozen=True)
class PartitionCompressor:
    """mapInArrow body: Arrow batches of (key, vector, ...) -> compressed rows. Plain data only, so Spark can
    ship it; each worker loads the registered model version once."""

    model_uri: str  # models:/<name>/<version>: a fixed version, never the alias, so every task agrees
    registry_uri: str
    key: str
    dtype: str

    def __call__(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)
        compressor = worker_compressor(self.model_uri, self.registry_uri)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            vectors = batch.column("vector")
            x = (
                vectors.flatten()
                .to_numpy(zero_copy_only=False)
                .astype(np.float32)
                .reshape(batch.num_rows, -1)
            )
            with torch.no_grad():
                z = compressor(torch.from_numpy(x)).numpy()  # (B, d)
            yield vector_rows(batch, self.key, z, self.dtype)


def output_schema(key: str, dtype: str) -> str:
    element = "tinyint" if dtype == "int8" else "float"
    lineage = ", ".join(f"{c} string" for c in PASSED_THROUGH)
    return f"{key} string, vector array<{element}>, scale float, event_timestamp timestamp, {lineage}"


@dataclass
class CheckedInput:
    """One entity's representation rows at the compressor's layer, checked and cached on the executors."""

    entity: str
    reg: RegisteredCompressor
    name: str
    version: int
    at: DataFrame


def checked_input(spark: SparkSession, settings: Settings, tables: DeltaTables, entity: str) -> CheckedInput:
    """Lineage and rows of `entity`'s representation table checked (raises CompressError naming the key):
    cheap next to compressing, so every entity is checked before any is compressed."""
    from pyspark.sql import functions as F

    from llmfeat.registry import resolve_alias

    key, name = entity_key(entity), repr_table(entity)
    reg = resolve_alias(settings, COMPRESSOR_OF[entity])
    check_declared(entity, reg)
    version = tables.version(name)
    if version is None:
        raise CompressError(
            f"{name} not found under {tables.root}: run `llmfeat encode --entity {entity}` first"
        )
    reprs = tables.read_spark(name, version)
    check_lineage(reprs, name, reg, settings.marc.layer)
    at = reprs.where(F.col("layer") == reg.layer).cache()
    try:
        expected = (
            at.select(key).distinct() if entity == "user_snapshots" else tables.read_spark(entity).select(key)
        )
        check_rows(at, expected, key, name, reg.layer, reg.in_dim)
    except BaseException:
        at.unpersist()
        raise
    return CheckedInput(entity, reg, name, version, at)


def compress_entity(settings: Settings, tables: DeltaTables, checked: CheckedInput) -> DataFrame:
    """The compressed rows with lineage as a Spark frame kept on the executors (nothing written yet; the
    caller unpersists it)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from llmfeat.registry import model_uri, tracking_uri

    entity, reg, key = checked.entity, checked.reg, entity_key(checked.entity)
    dtype = settings.marc.output_dtype
    fn = PartitionCompressor(model_uri(reg), tracking_uri(settings), key, dtype)
    cols = [key, "vector", "encoded_at", *PASSED_THROUGH]
    out = checked.at.select(*cols).mapInArrow(fn, output_schema(key, dtype))
    lineage = {
        "source_table": F.lit(checked.name),
        "source_version": F.lit(checked.version).cast("long"),
        "layer": F.lit(reg.layer).cast("long"),
        "compressor_name": F.lit(reg.name),
        "compressor_version": F.lit(reg.version).cast("string"),
        "dtype": F.lit(dtype),
    }
    out = out.select(*out.columns, *[col.alias(c) for c, col in lineage.items()])
    # Computed once on the executors: the gate and the MERGE read the cached rows.
    rows = valid_from(out, entity, tables).orderBy(key).persist(StorageLevel.MEMORY_AND_DISK)
    rows.count()
    return rows


def history_until(tables: DeltaTables, snapshots: DataFrame) -> DataFrame:
    """Distinct snapshots(user_id, snapshot_at) -> the same with `history_until`: the newest behaviour
    strictly before the snapshot's time (what its text can hold; null: none). A running max over each user's
    events and snapshots in time order (a snapshot sorts before an event at the same time)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    events = tables.read_spark("interactions").select(  # one behaviour each
        "user_id",
        F.col("event_timestamp").alias("at"),
        F.lit(1).alias("kind"),
        F.lit(None).cast("timestamp").alias("snap"),
    )
    snaps = snapshots.select(
        "user_id",
        F.col("snapshot_at").alias("at"),
        F.lit(0).alias("kind"),
        F.col("snapshot_at").alias("snap"),
    )
    before = Window.partitionBy("user_id").orderBy("at", "kind").rowsBetween(Window.unboundedPreceding, 0)
    newest = F.max(F.when(F.col("kind") == 1, F.col("at"))).over(before)
    both = events.unionByName(snaps).select("user_id", "kind", "snap", newest.alias("history_until"))
    return both.where(F.col("kind") == 0).select(
        "user_id", F.col("snap").alias("snapshot_at"), "history_until"
    )


def valid_from(rows: DataFrame, entity: str, tables: DeltaTables) -> DataFrame:
    """event_timestamp = from when a vector may be used: a user snapshot from its own time (its text holds
    only earlier behaviour; user_id added), an item from its first availability (its first interaction, or
    the encode time for an item nobody has seen yet): every interaction then finds a vector."""
    from pyspark.sql import functions as F

    if entity == "user_snapshots":
        user, at = snapshot_parts_columns("snapshot_id")
        rows = rows.withColumn("event_timestamp", at)
        rows = rows.withColumn("user_id", user)
        cuts = rows.select("user_id", F.col("event_timestamp").alias("snapshot_at")).distinct()
        until = history_until(tables, cuts).withColumnRenamed("snapshot_at", "event_timestamp")
        return rows.join(until, ["user_id", "event_timestamp"], "left").select(*rows.columns, "history_until")
    if entity != "items":
        return rows
    first = tables.read_spark("interactions").groupBy("item_id").agg(F.min("event_timestamp").alias("seen"))
    stamp = F.least(F.coalesce("seen", "event_timestamp"), F.col("event_timestamp"))
    joined = rows.join(first, "item_id", "left")
    return joined.select(*[stamp.alias(c) if c == "event_timestamp" else F.col(c) for c in rows.columns])


def check_feature_tables(results: list[Any], tables: Any, settings: Settings) -> None:
    """Every feature table passes its great-expectations gate before the first commit (raises GateFailed)."""
    from pyspark.sql import functions as F

    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import feature_suite

    run_id = new_run_id("compress")
    for entity, rows, reg in results:
        table = feature_table(entity, reg)
        first = rows.select(F.size("vector").alias("n")).first()
        dim = first["n"] if first is not None else settings.marc.out_dim
        suite = feature_suite(
            table, entity_key(entity), dim, settings.marc.output_dtype, conf=settings.validation
        )
        gate(rows, suite, table=table, tables=tables, run_id=run_id, conf=settings.validation)


def run(spark: SparkSession, settings: Settings, entities: list[str] | None = None) -> list[CompressSummary]:
    """Compute every entity's table first, then commit: a bad row anywhere writes nothing."""
    from llmfeat.delta_io import open_tables
    from llmfeat.models.marc.baselines import bytes_per_vector

    tables = open_tables(settings, spark)
    inputs: list[CheckedInput] = []
    results: list[tuple[str, DataFrame, RegisteredCompressor]] = []
    try:
        for e in entities or list(DEFAULT_ENTITIES):
            inputs.append(checked_input(spark, settings, tables, e))
        for checked in inputs:
            results.append((checked.entity, compress_entity(settings, tables, checked), checked.reg))
            checked.at.unpersist()
        check_feature_tables(results, tables, settings)
        summaries = []
        for entity, rows, reg in results:
            table = feature_table(entity, reg)
            version = tables.upsert(table, rows, [entity_key(entity)], delete_missing=True)
            dtype = settings.marc.output_dtype
            summaries.append(
                CompressSummary(
                    entity,
                    table,
                    rows.count(),
                    version,
                    f"{reg.name} v{reg.version} @{reg.alias}",
                    reg.layer,
                    dtype,
                    bytes_per_vector(reg.out_dim, dtype),
                )  # fmt: skip
            )
        return summaries
    finally:
        for checked in inputs:
            checked.at.unpersist()
        for _entity, rows, _reg in results:
            rows.unpersist()


def parse_entities(value: str) -> list[str]:
    names = list(DEFAULT_ENTITIES) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in COMPRESSIBLE]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown entity {unknown}; expected user_snapshots, items, users or all (user_snapshots, items)"
        )
    return names


def entity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--entity",
        type=parse_entities,
        default=list(DEFAULT_ENTITIES),
        help="user_snapshots, items, users (static), or all (default: user_snapshots, items)",
    )


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="compress")
    config_args(parser)
    entity_args(parser)
    args = parser.parse_args(argv)

    def body(spark: SparkSession, settings: Settings) -> None:
        for summary in run(spark, settings, args.entity):
            print(summary)

    return run_with_session("compress", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.compress import main as package_main

    sys.exit(package_main())
