"""Encode job: entity texts -> `<entity>_repr` Delta tables of pooled LLM layer states.

    spark-submit spark_jobs/encode.py --entity items [--config local|PATH] [--set key=value ...]
    llmfeat encode --entity items,users,behaviors [--set encode.layers=[8,15,22,30]]

Tables (under <data_dir>/delta), one row per (key, layer):
    items_repr      item_id      layer, vector, encoder_id, weights_hash, pooling, max_length, content_hash,
    users_repr      user_id      encoded_at (UTC)
    behaviors_repr  behavior_id

`vector` holds float16 values (Delta has no half-precision type, so they are stored as float32 numbers that
are exactly representable in float16). All layers of a text come from one forward pass on an executor
(mapInArrow), on the GPU Spark assigned to the task when there is one. The encoded rows stay on the executors:
each chunk is kept there (memory, then disk) while its gate and its MERGE read it; the driver sees counts.

Incremental: a text is encoded only when no complete set of rows exists for its content hash under the same
encoder, weights, pooling and max length. Rows are committed in chunks of `commit_rows` texts: the rows of
keys new to the table are appended, the others MERGEd by (key, layer); a run that fails midway keeps the
finished commits, and a re-run does only the rest, without duplicates.
Keys that vanished from the source (or whose text became empty) are deleted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from llmfeat.config import EncodeConf, Settings
from llmfeat.models.encoder import (
    EncoderConfig,
    EncoderError,
    ModelSource,
    check_layers,
    model_depth,
    model_width,
    resolve_model,
    weights_hash,
)
from llmfeat.reprs import ENTITY_KEYS, REPR_SINGLE_VALUED, entity_key, repr_table
from llmfeat.session import gpu_profile

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables

log = logging.getLogger("llmfeat.encode")

ALL_ENTITIES = ("items", "user_snapshots", "behaviors")
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Lineage:
    encoder_id: str
    weights_hash: str
    pooling: str
    max_length: int


@dataclass
class EncodeSummary:
    entity: str
    table: str
    version: int | None = None
    encoded: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> texts not encoded
    truncated: int = 0
    tokens: int = 0
    deleted: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)  # one line per task: assigned GPU -> device used

    def __str__(self) -> str:
        bad = ", ".join(f"{n:,} {why}" for why, n in self.skipped.items()) or "none"
        if not self.encoded:
            head = f"{self.table}: nothing to encode ({self.unchanged:,} texts unchanged)"
        else:
            rate = self.seconds or 1e-9
            head = (
                f"{self.table}: encoded {self.encoded:,} texts in {self.seconds:.1f} s "
                f"({self.encoded / rate:.1f} texts/s, {self.tokens / rate:,.0f} tokens/s); "
                f"unchanged {self.unchanged:,}; truncated {self.truncated:,}"
            )
        return f"{head}; skipped: {bad}; deleted {self.deleted:,}; version {self.version}"


def encoder_config(cfg: EncodeConf) -> EncoderConfig:
    return EncoderConfig(
        layers=tuple(cfg.layers),
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        max_length=cfg.max_length,
        token_budget=cfg.token_budget,
        max_batch=cfg.max_batch,
        pack_width=cfg.pack_width,
        compile=cfg.compile,
    )


# ---------------------------------------------------------------------------------------------- transforms


def entity_texts(tables: DeltaTables, entity: str, cfg: EncodeConf) -> DataFrame:
    """(key, text) for an entity, read from the ingest tables."""
    from llmfeat.user_text import history_cut, user_snapshot_texts, user_texts

    if entity == "items":
        return tables.read_spark("items").select("item_id", "text")
    if entity == "behaviors":
        return tables.read_spark("behaviors").select("behavior_id", "text")
    if entity == "user_snapshots":
        return user_snapshot_texts(
            tables.read_spark("users"),
            tables.read_spark("user_behaviors"),
            tables.read_spark("behaviors"),
            cfg.snapshot_every_days,
            cfg.user_max_behaviors,
            cfg.user_max_chars,
        )
    try:
        cut = history_cut(tables.read_spark("interactions"), cfg.history_cut)
    except ValueError as err:
        raise EncoderError(str(err)) from None
    log.info("user texts: behaviours before %s", cut.isoformat())
    return user_texts(
        tables.read_spark("users"),
        tables.read_spark("user_behaviors"),
        tables.read_spark("behaviors"),
        cut,
        cfg.user_max_behaviors,
        cfg.user_max_chars,
    )


def with_checks(texts: DataFrame, key: str) -> DataFrame:
    """Adds content_hash and `problem` (null when the text can be encoded)."""
    from pyspark.sql import functions as F

    text = F.col("text")
    problem = (
        F.when(F.col(key).isNull(), "null key")
        .when(text.isNull() | (F.trim(text) == ""), "empty text")
        .when(~F.is_valid_utf8(text), "invalid UTF-8")
    )
    return texts.withColumn("content_hash", F.substring(F.sha2(text, 256), 1, 16)).withColumn(
        "problem", problem
    )


def stale_texts(good: DataFrame, existing: DataFrame | None, key: str, lineage: Lineage, layers: list[int]):  # type: ignore[no-untyped-def]
    """Texts without a complete, current set of rows: new keys, changed content, another encoder or layer."""
    from pyspark.sql import functions as F

    if existing is None:
        return good
    current = existing.where(
        (F.col("encoder_id") == lineage.encoder_id)
        & (F.col("weights_hash") == lineage.weights_hash)
        & (F.col("pooling") == lineage.pooling)
        & (F.col("max_length") == lineage.max_length)
        & F.col("layer").isin(layers)
    )
    complete = (
        current.groupBy(key, "content_hash")
        .agg(F.countDistinct("layer").alias("n"))
        .where(F.col("n") == len(set(layers)))
    )
    return good.join(complete.select(key, "content_hash"), [key, "content_hash"], "left_anti")


def repr_rows(encoded: Any, key: str, lineage: Lineage, encoded_at: datetime) -> Any:
    """Executor output -> the published schema (lineage constants added, diagnostics dropped).

    `encoded` is the Spark frame of `PartitionEncoder` (the job) or an Arrow table of the same columns."""
    if isinstance(encoded, pa.Table):
        n = encoded.num_rows
        constant = {c: pa.array([v] * n, t) for c, (v, t, _) in _lineage_values(lineage, encoded_at).items()}
        lineage_cols = {c: constant[c] for c in REPR_SINGLE_VALUED}
        return pa.table({key: encoded[key], "layer": encoded["layer"], "vector": encoded["vector"],
                         **lineage_cols, "content_hash": encoded["content_hash"],
                         "encoded_at": constant["encoded_at"]})  # fmt: skip
    from pyspark.sql import functions as F

    values = _lineage_values(lineage, encoded_at)
    constant = {c: F.lit(v).cast(t).alias(c) for c, (v, _, t) in values.items()}
    return encoded.select(
        key,
        "layer",
        "vector",
        *[constant[c] for c in REPR_SINGLE_VALUED],
        "content_hash",
        constant["encoded_at"],
    )


def _lineage_values(lineage: Lineage, encoded_at: datetime) -> dict[str, tuple[Any, pa.DataType, str]]:
    """column -> (value, Arrow type, Spark type) of the constant lineage columns."""
    return {
        "encoder_id": (lineage.encoder_id, pa.string(), "string"),
        "weights_hash": (lineage.weights_hash, pa.string(), "string"),
        "pooling": (lineage.pooling, pa.string(), "string"),
        "max_length": (lineage.max_length, pa.int32(), "int"),
        "encoded_at": (encoded_at, pa.timestamp("us", tz="UTC"), "timestamp"),
    }


# ---------------------------------------------------------------------------------------------- executors


def output_schema(key: str) -> str:
    return (
        f"{key} string, layer int, vector array<float>, content_hash string, "
        "truncated boolean, tokens int, device string"
    )


@dataclass(frozen=True)
class PartitionEncoder:
    """The function each task runs (mapInArrow): Arrow batches of (key, text, content_hash) -> rows per layer.

    Plain data only, so Spark can ship it; the model is loaded on first use in each Python worker and reused.
    """

    source: ModelSource
    cfg: EncoderConfig
    key: str
    device_pref: str = "auto"

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch
        from pyspark import TaskContext

        from llmfeat.models.encoder import select_device, worker_encoder

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ctx = TaskContext.get()
        gpu = ctx.resources().get("gpu") if ctx else None
        assigned = list(gpu.addresses) if gpu else None
        device, why = select_device(assigned, self.device_pref)
        torch.set_num_threads(max(1, ctx.cpus() if ctx else 1))
        task = f"task {ctx.partitionId() if ctx else 0}"
        label = f"{task}: gpu {','.join(assigned) if assigned else 'none'} -> {device} ({why})"
        log.info(label)
        encoder = worker_encoder(self.source, self.cfg, device)
        for batch in batches:
            if batch.num_rows:
                yield self.encode_batch(encoder, batch, label)

    def encode_batch(self, encoder: Any, batch: pa.RecordBatch, label: str) -> pa.RecordBatch:
        keys = batch.column(self.key).to_pylist()
        out = encoder.encode(batch.column("text").to_pylist())
        n, n_layers, hidden = out.vectors.shape  # [N, L, H]
        half = out.vectors.astype(np.float16)
        overflow = np.flatnonzero(~np.isfinite(half).all(axis=(1, 2)))
        if len(overflow):
            raise EncoderError(
                f"{self.key}={keys[overflow[0]]!r}: a pooled value exceeds float16's range "
                f"({np.abs(out.vectors[overflow[0]]).max():.3g} > {FP16_MAX:.0f}); set encode.normalize: l2"
            )
        rows = n * n_layers
        flat = pa.array(half.astype(np.float32).reshape(-1))  # float16 values, float32 storage
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * hidden), flat)
        log.info(
            "%s: %d texts, %d tokens in %.1f s (%.1f texts/s, %.0f tokens/s)",
            label.split(":")[0], n, out.tokens, out.seconds, n / max(out.seconds, 1e-9),
            out.tokens / max(out.seconds, 1e-9),
        )  # fmt: skip
        return pa.RecordBatch.from_pydict(
            {
                self.key: pa.array(np.repeat(np.array(keys, dtype=object), n_layers), pa.string()),
                "layer": pa.array(np.tile(np.array(self.cfg.layers, dtype=np.int32), n)),
                "vector": vectors,
                "content_hash": pa.array(np.repeat(batch.column("content_hash").to_numpy(False), n_layers)),
                "truncated": pa.array(np.repeat(out.truncated, n_layers)),
                "tokens": pa.array(np.repeat(out.lengths, n_layers).astype(np.int32)),
                "device": pa.array([label] * rows, pa.string()),
            }
        )


# ---------------------------------------------------------------------------------------------- the job


def run(spark: SparkSession, settings: Settings, entity: str, only: DataFrame | None = None) -> EncodeSummary:
    """Encode the entity's new or changed texts; `only` (a frame with the key column) restricts the run to
    those keys, e.g. a sample, and then nothing is deleted."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from llmfeat.delta_io import open_tables
    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import repr_suite

    cfg, key, name = settings.encode, entity_key(entity), repr_table(entity)
    enc_cfg = encoder_config(cfg)
    source = resolve_model(cfg.model, cfg.cache_dir)  # a GGUF is converted here, once, before any task
    check_layers(enc_cfg.layers, model_depth(source.path), source.encoder_id)
    lineage = Lineage(source.encoder_id, weights_hash(source.path), enc_cfg.pooling_label, cfg.max_length)
    tables = open_tables(settings, spark)
    summary = EncodeSummary(entity, name, tables.version(name))

    texts = with_checks(entity_texts(tables, entity, cfg), key)
    if only is not None:
        texts = texts.join(only.select(key).distinct(), key, "left_semi")
    texts = texts.cache()
    for row in texts.where(F.col("problem").isNotNull()).groupBy("problem").count().collect():
        summary.skipped[row["problem"]] = row["count"]
        examples = [r[key] for r in texts.where(F.col("problem") == row["problem"]).limit(3).collect()]
        log.warning(
            "%s: %d texts skipped (%s), e.g. %s=%s", name, row["count"], row["problem"], key, examples
        )
    good = texts.where(F.col("problem").isNull()).select(key, "text", "content_hash")
    existing = tables.read_spark(name) if tables.exists(name) else None
    todo = stale_texts(good, existing, key, lineage, list(cfg.layers)).cache()
    known = existing.select(key).distinct().cache() if existing is not None else None  # keys held already
    n_todo, n_good = todo.count(), good.count()
    summary.unchanged = n_good - n_todo
    log.info("%s: %d texts to encode, %d unchanged (%s, layers %s)", name, n_todo, summary.unchanged,
             lineage, list(cfg.layers))  # fmt: skip

    started = time.monotonic()
    n_chunks = max(1, -(-n_todo // cfg.commit_rows))
    parts = cfg.partitions or spark.sparkContext.defaultParallelism
    encode_fn = PartitionEncoder(source, enc_cfg, key, cfg.device)
    suite, run_id = repr_suite(entity, key, model_width(source.path)), new_run_id(f"encode-{entity}")
    gpus = gpu_profile(spark, settings.spark.gpu)  # on a GPU cluster, only this stage asks for GPUs
    bar = tqdm(total=n_todo, desc=name, unit="text", disable=None, mininterval=1.0)  # none without a TTY
    for chunk in range(n_chunks if n_todo else 0):
        part = todo if n_chunks == 1 else todo.where(F.pmod(F.xxhash64(key), F.lit(n_chunks)) == chunk)
        encoded = part.repartition(parts).mapInArrow(encode_fn, output_schema(key), profile=gpus)
        # Kept on the executors (memory, then disk): the gate and the commit read it; the LLM runs once.
        encoded = encoded.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            count_chunk(encoded, cfg.layers[0], summary, bar)
            rows = repr_rows(encoded, key, lineage, datetime.now(UTC))
            # The gate runs before each commit: a failing chunk is quarantined, earlier chunks stay committed.
            gate(rows, suite, table=name, tables=tables, run_id=run_id, conf=settings.validation)
            summary.version = commit_chunk(tables, name, key, rows, known)
        finally:
            encoded.unpersist()
        log.info("%s: chunk %d/%d committed, version %s", name, chunk + 1, n_chunks, summary.version)
    bar.close()
    summary.seconds = time.monotonic() - started
    summary.deleted = delete_vanished(tables, name, key, good, existing) if only is None else 0
    summary.version = tables.version(name)
    for frame in (texts, todo, known):
        if frame is not None:
            frame.unpersist()
    return summary


def commit_chunk(
    tables: DeltaTables, name: str, key: str, rows: DataFrame, known: DataFrame | None
) -> int | None:
    """Rows of keys the table did not hold when the run started are appended (a streamed write, no MERGE);
    the others, re-encoded texts, MERGE by (key, layer). A failure between the two commits leaves the
    appended keys current: a re-run encodes only the rest."""
    fresh, changed = (rows, None) if known is None else (
        rows.join(known, key, "left_anti"), rows.join(known, key, "left_semi")
    )  # fmt: skip
    if not fresh.isEmpty():
        tables.write(name, fresh, mode="append")
    if changed is not None and not changed.isEmpty():
        tables.upsert(name, changed, [key, "layer"], compare=["content_hash", "encoded_at"])
    return tables.version(name)


def count_chunk(encoded: DataFrame, first_layer: int, summary: EncodeSummary, bar: Any) -> None:
    """Adds a chunk's texts, truncations and tokens (one Spark aggregation) and the tasks' device lines."""
    from pyspark.sql import functions as F

    first = encoded.where(F.col("layer") == first_layer)  # one row per text
    texts, truncated, tokens = first.agg(
        F.count("*"), F.sum(F.col("truncated").cast("long")), F.sum("tokens")
    ).first() or (0, 0, 0)
    bar.update(texts)
    summary.encoded += texts
    summary.truncated += int(truncated or 0)
    summary.tokens += int(tokens or 0)
    devices = [r["device"] for r in encoded.select("device").distinct().collect()]  # one line per task
    summary.devices = sorted(set(summary.devices) | set(devices))


def delete_vanished(
    tables: DeltaTables, name: str, key: str, good: DataFrame, existing: DataFrame | None
) -> int:
    """Delete the rows of keys no longer in the source (or whose text became unusable): one commit, a MERGE
    against the vanished keys (an anti-join on the executors; no key list is built on the driver)."""
    if existing is None:
        return 0
    from pyspark import StorageLevel

    gone = existing.select(key).distinct().join(good.select(key), key, "left_anti")
    gone = gone.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_gone = gone.count()
        if n_gone:
            tables.delete_keys(name, gone, [key])  # a MERGE ... WHEN MATCHED DELETE with the keys as source
            log.info("%s: deleted the rows of %d vanished keys", name, n_gone)
    finally:
        gone.unpersist()
    return n_gone


def parse_entities(value: str) -> list[str]:
    names = list(ALL_ENTITIES) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ENTITY_KEYS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown entity {unknown or value!r}; expected all ({', '.join(ALL_ENTITIES)}) or a list of "
            f"{', '.join(ENTITY_KEYS)}"
        )
    return names


def entity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--entity",
        type=parse_entities,
        default=list(ALL_ENTITIES),
        help="items, user_snapshots, behaviors, users (static, at encode.history_cut), a comma list, or all "
        "(default: all = items, user_snapshots, behaviors)",
    )


def run_all(spark: SparkSession, settings: Settings, entities: list[str]) -> list[EncodeSummary]:
    out = []
    for entity in entities:
        summary = run(spark, settings, entity)
        print(summary, flush=True)
        for line in summary.devices:  # which GPU each task was given, and the device it used
            print(f"  {line}", flush=True)
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="encode")
    config_args(parser)
    entity_args(parser)
    args = parser.parse_args(argv)
    return run_with_session(
        "encode",
        args.config,
        args.overrides,
        lambda spark, s: run_all(spark, s, args.entity),
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.encode import main as package_main

    sys.exit(package_main())
