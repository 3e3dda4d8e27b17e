"""The text an LLM reads for a user: demographics, then the behaviours before a time cut, oldest to newest.

    "Age 24, gender M, occupation technician. History, oldest to newest: rated 5: Toy Story (1995), ...; ..."

Only behaviours strictly before the cut enter (no leakage from the evaluation period). When the history is
too long (more than `max_behaviors`, or more than `max_chars` characters in all), the oldest behaviours are
dropped first, so the demographics and the most recent behaviours always survive. Time ties: ordered by text.

`user_text` (plain Python, for one user) and `user_texts` (Spark, for a table) build the same string.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from llmfeat.config import ConfigError
from llmfeat.reprs import snapshot_id_column
from llmfeat.sample import scalar

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables

SEP = "; "
HISTORY = " History, oldest to newest: "
NO_HISTORY = " No history yet."


def demographics(age: int | None, gender: str | None, occupation: str | None) -> str:
    fields = (("age", age), ("gender", gender), ("occupation", occupation))
    known = [f"{name} {value}" for name, value in fields if value not in (None, "")]
    text = ", ".join(known) or "unknown user"
    return text[0].upper() + text[1:] + "."


def user_text(
    age: int | None,
    gender: str | None,
    occupation: str | None,
    history: Iterable[tuple[datetime, str]],
    cut: datetime,
    max_behaviors: int = 50,
    max_chars: int = 1500,
) -> str:
    """One user's text from (event time, behaviour text) pairs in any order."""
    head = demographics(age, gender, occupation)
    newest_first = sorted(((ts, text) for ts, text in history if ts < cut), reverse=True)
    budget = max_chars - len(head) - len(HISTORY) + len(SEP)
    kept: list[str] = []
    for _, text in newest_first[:max_behaviors]:
        budget -= len(text) + len(SEP)
        if budget < 0:
            break
        kept.append(text)
    if not kept:
        return head + NO_HISTORY
    return head + HISTORY + SEP.join(reversed(kept))


def history_cut(interactions: DataFrame, cut: str) -> datetime:
    """A split name ("valid": the first event of the valid split) or an ISO timestamp -> a UTC datetime."""
    from pyspark.sql import functions as F

    if cut in ("valid", "test"):
        first = interactions.where(F.col("split") == cut).agg(F.min("event_timestamp")).first()
        if first is None or first[0] is None:
            raise ConfigError(f"history cut {cut!r}: the interactions table has no {cut!r} rows")
        return first[0]
    try:
        return datetime.fromisoformat(cut)
    except ValueError:
        raise ConfigError(
            f"encode.history_cut {cut!r}: expected 'valid', 'test' or an ISO time (1998-03-01T00:00:00Z)"
        ) from None


def history_cut_time(spark: SparkSession | None, tables: DeltaTables, cut: str) -> datetime:
    """`history_cut` read from the interactions table, with Spark or (without a session) with delta-rs."""
    if spark is not None:
        return history_cut(tables.read_spark("interactions"), cut)
    if cut not in ("valid", "test"):
        return datetime.fromisoformat(cut)
    first = scalar(tables, "interactions", f"SELECT MIN(event_timestamp) FROM t WHERE split = '{cut}'")
    if first is None:
        raise ConfigError(f"history cut {cut!r}: the interactions table has no {cut!r} rows")
    return first  # type: ignore[no-any-return]


def _demographics_col() -> Column:
    """Spark twin of `demographics`."""
    from pyspark.sql import functions as F

    parts = [
        F.when(F.col(c).isNotNull() & (F.col(c).cast("string") != ""), F.concat(F.lit(f"{c} "), F.col(c)))
        for c in ("age", "gender", "occupation")
    ]
    joined = F.concat_ws(", ", *parts)
    text = F.when(joined == "", F.lit("unknown user")).otherwise(joined)
    return F.concat(F.upper(F.substring(text, 1, 1)), F.substring(text, 2, 1 << 20), F.lit("."))


def snapshot_times(user_behaviors: DataFrame, every_days: int = 1) -> DataFrame:
    """(user_id, snapshot_at): each user's first appearance (a demographics-only text), then the start of the
    period after each period of `every_days` days in which the user had behaviour. A snapshot's text holds
    only behaviours strictly before its time, so a row at or after it never sees its own label."""
    from pyspark.sql import functions as F

    seconds = every_days * 86400
    first = user_behaviors.groupBy("user_id").agg(F.min("event_timestamp").alias("snapshot_at"))
    epoch = F.unix_timestamp("event_timestamp")
    period_end = ((F.floor(epoch / seconds) + 1) * seconds).cast("timestamp")
    after = user_behaviors.select("user_id", period_end.alias("snapshot_at"))
    return first.unionByName(after).distinct()


def user_texts(
    users: DataFrame,
    user_behaviors: DataFrame,
    behaviors: DataFrame,
    cut: datetime,
    max_behaviors: int = 50,
    max_chars: int = 1500,
) -> DataFrame:
    """users(user_id, age, gender, occupation) + behaviours -> (user_id, text), one row per user at `cut`."""
    from pyspark.sql import functions as F

    cuts = users.select("user_id", F.lit(cut).cast("timestamp").alias("snapshot_at"))
    texts = user_texts_at(users, user_behaviors, behaviors, cuts, max_behaviors, max_chars)
    return texts.select("user_id", "text")


def user_snapshot_texts(
    users: DataFrame,
    user_behaviors: DataFrame,
    behaviors: DataFrame,
    every_days: int = 1,
    max_behaviors: int = 50,
    max_chars: int = 1500,
) -> DataFrame:
    """The user time series: (snapshot_id, text) for every snapshot of `snapshot_times`."""
    cuts = snapshot_times(user_behaviors, every_days)
    texts = user_texts_at(users, user_behaviors, behaviors, cuts, max_behaviors, max_chars)
    return texts.select(snapshot_id_column("user_id", "snapshot_at").alias("snapshot_id"), "text")


def user_texts_at(
    users: DataFrame,
    user_behaviors: DataFrame,
    behaviors: DataFrame,
    cuts: DataFrame,
    max_behaviors: int = 50,
    max_chars: int = 1500,
) -> DataFrame:
    """cuts(user_id, snapshot_at) -> (user_id, snapshot_at, text): demographics, then the behaviours strictly
    before snapshot_at, newest kept first within the budget, written oldest to newest (as `user_text`)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    heads = users.select("user_id", _demographics_col().alias("head"))
    cut_heads = cuts.join(heads, "user_id")
    past = (
        cut_heads.join(user_behaviors, "user_id")
        .where(F.col("event_timestamp") < F.col("snapshot_at"))
        .join(behaviors.select("behavior_id", "text"), "behavior_id")
    )
    newest_first = Window.partitionBy("user_id", "snapshot_at").orderBy(
        F.desc("event_timestamp"), F.desc("text")
    )
    running = newest_first.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    budget = F.lit(max_chars) - F.length("head") - F.lit(len(HISTORY) - len(SEP))
    kept = (
        past.withColumn("recency", F.row_number().over(newest_first))
        .withColumn("chars", F.sum(F.length("text") + F.lit(len(SEP))).over(running))
        .where((F.col("recency") <= max_behaviors) & (F.col("chars") <= budget))
    )
    history = kept.groupBy("user_id", "snapshot_at").agg(
        F.array_join(
            F.transform(
                F.sort_array(F.collect_list(F.struct("event_timestamp", "text"))), lambda s: s["text"]
            ),
            SEP,
        ).alias("history")
    )
    text = F.when(F.col("history").isNull(), F.concat("head", F.lit(NO_HISTORY))).otherwise(
        F.concat("head", F.lit(HISTORY), "history")
    )
    return cut_heads.join(history, ["user_id", "snapshot_at"], "left").select(
        "user_id", "snapshot_at", text.alias("text")
    )
