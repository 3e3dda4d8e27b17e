"""Ingest job: raw ratings, items and users -> the Delta tables every other job reads.

    spark-submit spark_jobs/ingest.py --config conf/local.yaml [--set key=value ...]
    llmfeat ingest [--profile local] [--set key=value ...]

Tables (under <data_dir>/delta):
    items           item_id, title, year, genres ("A|B"), text
    users           user_id, age, gender, occupation
    interactions    user_id, item_id, rating, label (rating >= threshold), event_timestamp, split
    behaviors       behavior_id (stable hash of text), text ("rated 5: Toy Story (1995), Animation|Comedy")
    user_behaviors  user_id, behavior_id, item_id, event_timestamp

Every input check and every table's great-expectations gate (validation/) runs before the first write: bad
input leaves every table at its previous version (rejected rows go to the quarantine table).

Text fields (item title and genres, user gender and occupation) longer than `ingest.max_text_chars` are cut
to that length and counted in the job's summary (`ingest.long_text: cut`, the default), or fail the job with
the row's id before any commit (`ingest.long_text: reject`).
Each table is MERGEd by key with deletes of vanished rows: a re-run with the same input commits nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfeat.config import IngestConf, Settings, SourceFiles
from llmfeat.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables

log = logging.getLogger("llmfeat.ingest")
TEXT_COLUMNS = {"items": ["title", "genres"], "users": ["gender", "occupation"]}
REQUIRED = {
    "interactions": ["user_id", "item_id", "rating", "timestamp"],
    "items": ["item_id", "title"],
    "users": ["user_id"],
}
OPTIONAL = {"items": ["year", "genres"], "users": ["age", "gender", "occupation"]}
TABLE_KEYS = {
    "items": ["item_id"],
    "users": ["user_id"],
    "interactions": ["user_id", "item_id", "event_timestamp"],
    "behaviors": ["behavior_id"],
    "user_behaviors": ["user_id", "item_id", "event_timestamp"],
}


class IngestError(UserError, ValueError):
    """Bad input: names the file, the column and an example row."""


@dataclass(frozen=True)
class TableSummary:
    name: str
    path: str
    version: int
    rows: int
    cut_texts: dict[str, int] = field(default_factory=dict)  # column -> texts cut to ingest.max_text_chars


def ml100k_source(ml100k_dir: str | None = None) -> SourceFiles:
    """MovieLens-100k as shipped inside the installed recbole package (read as files, never imported)."""
    if ml100k_dir is None:
        spec = importlib.util.find_spec("recbole")
        if spec is None or spec.origin is None:
            raise IngestError(
                "ingest.source is ml-100k but the recbole package (MovieLens-100k) is not installed: "
                "pip install --no-deps recbole==1.2.1 (its own dependencies are not needed)"
            )
        ml100k_dir = os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k")
    d = Path(ml100k_dir)
    return SourceFiles(
        interactions=str(d / "ml-100k.inter"),
        items=str(d / "ml-100k.item"),
        users=str(d / "ml-100k.user"),
        format="tsv",
        columns={"title": "movie_title", "year": "release_year", "genres": "class"},
        genre_sep=" ",
    )


def source_files(cfg: IngestConf) -> SourceFiles:
    if cfg.source == "ml-100k":
        return ml100k_source(cfg.ml100k_dir)
    if cfg.files is None:
        raise IngestError(
            "ingest.source is files but ingest.files is not set (interactions, items, users paths)"
        )
    return cfg.files


def find_source(settings: Settings) -> SourceFiles:
    """The source's files, or the data package, found before the Spark session starts (a missing one is an
    error in a second, not after a JVM start)."""
    return source_files(settings.ingest)


def check_text_file(path: str) -> None:
    """Empty files and invalid UTF-8 fail here, with the line, before Spark silently replaces bad bytes."""
    p = Path(path)
    if not p.exists():
        raise IngestError(f"{path}: file not found")
    if p.stat().st_size == 0:
        raise IngestError(f"{path}: file is empty")
    with p.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise IngestError(
                    f"{path}: invalid UTF-8 at line {lineno}, byte {err.start}: {line[:120]!r}"
                ) from None


def read_source(spark: SparkSession, files: SourceFiles, kind: str) -> DataFrame:
    """One source file -> a DataFrame with llmfeat's column names (all strings for text formats)."""
    path = getattr(files, kind)
    if files.format == "parquet":
        if not Path(path).exists():
            raise IngestError(f"{path}: file not found")
        df = spark.read.parquet(path)
    else:
        check_text_file(path)
        sep = "\t" if files.format == "tsv" else ","
        df = spark.read.csv(path, header=True, sep=sep, inferSchema=False, quote='"', escape='"')
    # recbole headers carry a type suffix ("user_id:token"); mapped names come from config.
    df = df.toDF(*[c.split(":")[0] for c in df.columns])
    renames = {theirs: ours for ours, theirs in files.columns.items() if theirs in df.columns}
    df = df.select([df[c].alias(renames.get(c, c)) for c in df.columns])
    missing = [c for c in REQUIRED[kind] if c not in df.columns]
    if missing:
        raise IngestError(
            f"{path}: missing column(s) {missing} for {kind}; found {df.columns}. "
            f"Map your names with ingest.files.columns (llmfeat name -> yours)"
        )
    if df.limit(1).count() == 0:
        raise IngestError(f"{path}: file is empty (a header but no rows)")
    keep = REQUIRED[kind] + [c for c in OPTIONAL.get(kind, []) if c in df.columns]
    return df.select(*keep)


def _fail_if_any(bad: DataFrame, path: str, column: str, problem: str) -> None:
    rows = bad.limit(3).collect()
    if rows:
        examples = "; ".join(str(r.asDict()) for r in rows)
        raise IngestError(f"{path}: column {column!r}: {problem}; example row(s): {examples}")


def _fail_on_first(df: DataFrame, path: str, checks: list[tuple[str, Column, str]]) -> None:
    """Row checks (column, a bad row's condition, problem) in one pass over `df`, instead of one scan of the
    file each; the first check that a row fails raises, with examples from a second pass over those rows."""
    from pyspark.sql import functions as F

    flags = df.select(
        [
            F.max(F.coalesce(bad, F.lit(False)).cast("int")).alias(str(i))
            for i, (_, bad, _) in enumerate(checks)
        ]
    ).first()
    for i, (column, bad, problem) in enumerate(checks):
        if flags is not None and flags[str(i)]:
            _fail_if_any(df.where(bad), path, column, problem)


def check_ids(df: DataFrame, path: str, keys: list[str]) -> None:
    from pyspark.sql import functions as F

    for key in keys:
        _fail_if_any(
            df.where(F.col(key).isNull() | (F.trim(F.col(key).cast("string")) == "")), path, key, "null id"
        )
    dup = df.groupBy(*keys).count().where("count > 1")
    _fail_if_any(dup, path, "+".join(keys), "duplicate id")


def parse_timestamp(col: str):  # type: ignore[no-untyped-def]
    """Epoch seconds (numeric or numeric text) or an ISO-8601 string -> TIMESTAMP (UTC session)."""
    from pyspark.sql import functions as F

    text = F.trim(F.col(col).cast("string"))
    seconds = text.try_cast("double")
    return F.when(seconds.isNotNull(), F.timestamp_micros((seconds * 1_000_000).cast("long"))).otherwise(
        F.try_to_timestamp(text)
    )


def interactions_table(raw: DataFrame, path: str, cfg: IngestConf) -> DataFrame:
    from pyspark.sql import functions as F

    df = raw.select(
        F.trim(F.col("user_id").cast("string")).alias("user_id"),
        F.trim(F.col("item_id").cast("string")).alias("item_id"),
        F.col("rating").alias("rating_raw"),
        F.col("timestamp").alias("timestamp_raw"),
        F.col("rating").cast("string").try_cast("double").alias("rating"),
        parse_timestamp("timestamp").alias("event_timestamp"),
    )
    null_id = [(key, F.col(key).isNull() | (F.col(key) == ""), "null id") for key in ("user_id", "item_id")]
    _fail_on_first(df, path, [
        *null_id,
        ("rating", F.col("rating").isNull(), "not a number"),
        ("timestamp", F.col("event_timestamp").isNull(),
         "unparsable timestamp (expect epoch seconds or ISO-8601)"),
    ])  # fmt: skip
    df = df.drop("rating_raw", "timestamp_raw")
    _fail_if_any(
        df.groupBy("user_id", "item_id", "event_timestamp").count().where("count > 1"),
        path,
        "user_id+item_id+timestamp",
        "duplicate interaction",
    )
    return with_split(df, cfg).withColumn("label", (F.col("rating") >= cfg.label_threshold).cast("int"))


def time_cuts(df: DataFrame, cfg: IngestConf) -> tuple[int, int]:
    """Global time cuts (epoch micros) so that about train/valid/test = 1-v-t / v / t of the rows."""
    micros = df.select((df["event_timestamp"].cast("double") * 1_000_000).alias("us"))
    q = micros.approxQuantile("us", [1 - cfg.valid_frac - cfg.test_frac, 1 - cfg.test_frac], 0.0)
    return int(q[0]), int(q[1])


def with_split(df: DataFrame, cfg: IngestConf) -> DataFrame:
    from pyspark.sql import functions as F

    valid_cut, test_cut = time_cuts(df, cfg)
    us = F.unix_micros(F.col("event_timestamp"))
    return df.withColumn(
        "split", F.when(us < valid_cut, "train").when(us < test_cut, "valid").otherwise("test")
    )


def limit_texts(
    df: DataFrame, path: str, key: str, columns: list[str], cfg: IngestConf
) -> tuple[DataFrame, dict[str, int]]:
    """Text columns longer than cfg.max_text_chars: cut (returns the count per column) or, with
    cfg.long_text = reject, an IngestError naming the file, the column and the rows' ids."""
    from pyspark.sql import functions as F

    limit = cfg.max_text_chars
    present = [c for c in columns if c in df.columns]
    if limit <= 0 or not present:
        return df, {}
    if cfg.long_text == "reject":
        for c in present:
            too_long = df.where(F.length(c) > limit).select(key, F.length(c).alias(f"{c}_chars"))
            _fail_if_any(too_long, path, c, f"text longer than ingest.max_text_chars ({limit:,} characters); "
                         "shorten it, raise the limit or set ingest.long_text=cut")  # fmt: skip
        return df, {}
    row = df.select([F.sum((F.length(c) > limit).cast("int")).alias(c) for c in present]).first()
    cut = {c: int(row[c] or 0) for c in present} if row is not None else {}
    cut = {c: n for c, n in cut.items() if n}
    if cut:
        log.warning("%s: texts longer than %d characters cut: %s", path, limit, cut)
    kept = [F.substring(F.col(c), 1, limit).alias(c) if c in cut else F.col(c) for c in df.columns]
    return df.select(kept), cut


def items_table(
    raw: DataFrame, path: str, genre_sep: str, cfg: IngestConf | None = None
) -> tuple[DataFrame, dict[str, int]]:
    """The items table and the number of texts cut per column (see `limit_texts`)."""
    from pyspark.sql import functions as F

    check_ids(raw, path, ["item_id"])
    cols = raw.columns
    year = F.col("year").cast("string").try_cast("int") if "year" in cols else F.lit(None).cast("int")
    genres = (
        F.array_join(F.split(F.trim(F.col("genres")), _regex_escape(genre_sep) + "+"), "|")
        if "genres" in cols
        else F.lit("")
    )
    df = raw.select(
        F.trim(F.col("item_id").cast("string")).alias("item_id"),
        F.trim(F.col("title")).alias("title"),
        year.alias("year"),
        F.coalesce(genres, F.lit("")).alias("genres"),
    )
    _fail_if_any(df.where(F.col("title").isNull() | (F.col("title") == "")), path, "title", "empty title")
    df, cut = limit_texts(df, path, "item_id", TEXT_COLUMNS["items"], cfg or IngestConf())
    head = F.when(F.col("year").isNotNull(), F.format_string("%s (%d)", "title", "year")).otherwise(
        F.col("title")
    )
    text = F.when(
        F.col("genres") != "", F.concat(head, F.lit(". Genres: "), F.regexp_replace("genres", r"\|", ", "))
    )
    return df.withColumn("text", text.otherwise(head)), cut


def users_table(raw: DataFrame, path: str, cfg: IngestConf | None = None) -> tuple[DataFrame, dict[str, int]]:
    """The users table and the number of texts cut per column (see `limit_texts`)."""
    from pyspark.sql import functions as F

    check_ids(raw, path, ["user_id"])
    cols = raw.columns

    def opt(name: str, cast: str) -> Column:
        col = F.trim(F.col(name).cast("string")) if name in cols else F.lit(None).cast("string")
        return (col.try_cast("int") if cast == "int" else col).alias(name)

    df = raw.select(
        F.trim(F.col("user_id").cast("string")).alias("user_id"),
        opt("age", "int"),
        opt("gender", "str"),
        opt("occupation", "str"),
    )
    return limit_texts(df, path, "user_id", TEXT_COLUMNS["users"], cfg or IngestConf())


def behavior_tables(interactions: DataFrame, items: DataFrame) -> tuple[DataFrame, DataFrame]:
    """One behaviour = one rated item as text; its id is a stable hash of the text, shared by all users."""
    from pyspark.sql import functions as F

    rated = interactions.join(items.select("item_id", "title", "year", "genres"), "item_id", "inner")
    head = F.when(F.col("year").isNotNull(), F.format_string("%s (%d)", "title", "year")).otherwise(
        F.col("title")
    )
    text = F.concat(
        F.lit("rated "),
        F.format_number("rating", 0).cast("string"),
        F.lit(": "),
        head,
        F.when(F.col("genres") != "", F.concat(F.lit(", "), F.col("genres"))).otherwise(F.lit("")),
    )
    rated = rated.withColumn("text", text).withColumn("behavior_id", F.substring(F.sha2("text", 256), 1, 16))
    behaviors = rated.select("behavior_id", "text").dropDuplicates(["behavior_id"])
    user_behaviors = rated.select("user_id", "behavior_id", "item_id", "event_timestamp")
    return behaviors, user_behaviors


def _regex_escape(sep: str) -> str:
    return "".join("\\" + ch if ch in r"\.^$|?*+()[]{}" else ch for ch in sep)


def build_tables(
    spark: SparkSession, cfg: IngestConf
) -> tuple[dict[str, DataFrame], dict[str, dict[str, int]]]:
    """Read and check every source, then derive the five tables; raises IngestError before any write.
    Also returns the texts cut per table and column (see `limit_texts`).

    The three sources are cached for the checks; `run` drops the cache once the tables are committed.
    """
    from pyspark.sql import functions as F

    files = source_files(cfg)
    items, items_cut = items_table(read_source(spark, files, "items"), files.items, files.genre_sep, cfg)
    users, users_cut = users_table(read_source(spark, files, "users"), files.users, cfg)
    items, users = items.cache(), users.cache()
    interactions = interactions_table(
        read_source(spark, files, "interactions"), files.interactions, cfg
    ).cache()
    for kind, known in (("item_id", items), ("user_id", users)):
        unknown = interactions.join(known.select(kind), kind, "left_anti")
        _fail_if_any(unknown, files.interactions, kind, f"id not found in the {kind[:-3]}s file")
    behaviors, user_behaviors = behavior_tables(interactions, items)
    interactions = interactions.select(
        "user_id", "item_id", "rating", "label", "event_timestamp", "split"
    ).orderBy("event_timestamp", "user_id", "item_id")
    frames = {
        "items": items.orderBy(F.col("item_id").cast("long"), "item_id"),
        "users": users.orderBy(F.col("user_id").cast("long"), "user_id"),
        "interactions": interactions,
        "behaviors": behaviors.orderBy("behavior_id"),
        "user_behaviors": user_behaviors.orderBy("user_id", "event_timestamp", "behavior_id"),
    }
    return frames, {"items": items_cut, "users": users_cut}


def run(spark: SparkSession, settings: Settings) -> list[TableSummary]:
    """Build, gate and MERGE the five tables. The tables stay on the executors (cached, spilling to disk);
    only counts and example rows reach the driver."""
    from pyspark import StorageLevel

    from llmfeat.delta_io import open_tables

    try:
        frames, cut = build_tables(spark, settings.ingest)
        # Computed once, before the first commit: the gates and the MERGEs read the same rows.
        frames = {name: df.persist(StorageLevel.MEMORY_AND_DISK) for name, df in frames.items()}
        rows = {name: df.count() for name, df in frames.items()}
        tables = open_tables(settings, spark)
        check_tables(frames, tables, settings)
        out = []
        for name, data in frames.items():
            version = tables.upsert(name, data, TABLE_KEYS[name], delete_missing=True)
            out.append(TableSummary(name, tables.path(name), version, rows[name], cut.get(name, {})))
        return out
    finally:
        # Spark caches by plan, not by file content: a stale cache would hide an edited input on re-run.
        spark.catalog.clearCache()


def check_tables(frames: dict[str, Any], tables: DeltaTables, settings: Settings) -> None:
    """Every table passes its great-expectations gate before the first commit (raises GateFailed)."""
    from llmfeat.validation import gate, new_run_id, raw_suite

    run_id, conf = new_run_id("ingest"), settings.validation
    for name, data in frames.items():
        gate(data, raw_suite(name, conf), table=name, tables=tables, run_id=run_id, conf=conf)


def format_summary(summaries: list[TableSummary]) -> str:
    lines = [f"{'table':<16}{'rows':>9}{'version':>9}  path"]
    lines += [f"{s.name:<16}{s.rows:>9,}{s.version:>9}  {s.path}" for s in summaries]
    cut = [f"{s.name}.{c} {n:,}" for s in summaries for c, n in s.cut_texts.items()]
    if cut:
        lines.append(f"texts cut to ingest.max_text_chars: {', '.join(cut)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import job_main

    return job_main(
        "ingest",
        argv,
        lambda spark, settings: print(format_summary(run(spark, settings))),
        before_session=find_source,
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.ingest import main as package_main

    sys.exit(package_main())
