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

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

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
            raise ValueError(f"encode.history_cut {cut!r}: the interactions table has no {cut!r} rows")
        return first[0]
    try:
        return datetime.fromisoformat(cut)
    except ValueError:
        raise ValueError(
            f"encode.history_cut {cut!r}: expected 'valid', 'test' or an ISO time (1998-03-01T00:00:00Z)"
        ) from None


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


def user_texts(
    users: DataFrame,
    user_behaviors: DataFrame,
    behaviors: DataFrame,
    cut: datetime,
    max_behaviors: int = 50,
    max_chars: int = 1500,
) -> DataFrame:
    """users(user_id, age, gender, occupation) + behaviours -> (user_id, text), one row per user."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    heads = users.select("user_id", _demographics_col().alias("head"))
    past = (
        user_behaviors.where(F.col("event_timestamp") < F.lit(cut))
        .join(behaviors.select("behavior_id", "text"), "behavior_id")
        .join(heads, "user_id")
    )
    newest_first = Window.partitionBy("user_id").orderBy(F.desc("event_timestamp"), F.desc("text"))
    running = newest_first.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    budget = F.lit(max_chars) - F.length("head") - F.lit(len(HISTORY) - len(SEP))
    kept = (
        past.withColumn("recency", F.row_number().over(newest_first))
        .withColumn("chars", F.sum(F.length("text") + F.lit(len(SEP))).over(running))
        .where((F.col("recency") <= max_behaviors) & (F.col("chars") <= budget))
    )
    history = kept.groupBy("user_id").agg(
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
    return heads.join(history, "user_id", "left").select("user_id", text.alias("text"))
