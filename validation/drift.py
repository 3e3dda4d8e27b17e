"""Drift between two versions of a feature table: the frame `drift_suite` checks.

Over the keys both versions hold: `cosine` (similarity of the new vector to the previous one) and `changed`
(1 when cosine < changed_below). Keys new in this version or gone from it are not drift: the table's own
suite checks those rows.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from llmfeat.validation.derived import Derived, is_spark, with_derived

COSINE, CHANGED = "cosine", "changed"


def joined_versions(new: Any, previous: Any, key: str, vector: str, changed_below: float) -> Any:
    prev_vector = f"previous_{vector}"
    cosine = Derived("cosine", vector, other=prev_vector)
    if is_spark(new):
        from pyspark.sql import functions as F

        if not is_spark(previous):
            previous = new.sparkSession.createDataFrame(pd.DataFrame(previous)[[key, vector]])
        old = previous.select(F.col(key), F.col(vector).alias(prev_vector))
        both = with_derived(new.select(key, vector).join(old, key, "inner"), (cosine,))
        both = both.withColumnRenamed(cosine.name, COSINE)
        return both.withColumn(CHANGED, (F.col(COSINE) < changed_below).cast("int"))
    if is_spark(previous):  # only the keys of the (in-process) new batch leave the executors
        keys = previous.sparkSession.createDataFrame(pd.DataFrame({key: pd.DataFrame(new)[key]}))
        previous = previous.select(key, vector).join(keys.distinct(), key, "left_semi").toPandas()
    old = pd.DataFrame(previous)[[key, vector]].rename(columns={vector: prev_vector})
    both = with_derived(pd.DataFrame(new)[[key, vector]].merge(old, on=key, how="inner"), (cosine,))
    both = both.rename(columns={cosine.name: COSINE})
    both[CHANGED] = (both[COSINE] < changed_below).astype("int64")
    return both
