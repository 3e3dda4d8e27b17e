"""Derived columns the suites check, computed the same way on Spark and pandas.

great-expectations 1.x cannot check array columns directly (its length expectation fails every row on pandas
and raises on Spark), so each vector check runs on a scalar column derived here:

    <vector>__dim      number of elements
    <vector>__finite   every element is finite (no NaN, no inf)
    <vector>__norm     L2 norm, times the per-row `scale` when the table stores int8 codes
    <vector>__min/max  smallest and largest element (the int8 code range)
    <a>__<b>__cosine   cosine similarity of two vector columns (drift between two versions)
    <time>__micros     a timestamp as epoch microseconds (compared with the states' newest_event_us)

Every derived name contains "__" so the gate can drop them before rows go to quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

Kind = Literal["dim", "finite", "norm", "min", "max", "cosine", "micros"]
ROW_ID = "_row"  # position of a row in the validated batch: ties a failing row to its expectation
SEP = "__"


@dataclass(frozen=True)
class Derived:
    kind: Kind
    column: str
    scale: str | None = None  # norm: a per-row scale column (int8 codes)
    other: str | None = None  # cosine: the second vector column

    @property
    def name(self) -> str:
        if self.kind == "cosine":
            return f"{self.column}{SEP}{self.other}{SEP}cosine"
        return f"{self.column}{SEP}{self.kind}"


def is_spark(data: Any) -> bool:
    return type(data).__module__.startswith("pyspark.")


def is_derived(column: str) -> bool:
    return SEP in column or column == ROW_ID


def add_pandas(df: pd.DataFrame, specs: tuple[Derived, ...]) -> pd.DataFrame:
    out = df.reset_index(drop=True).copy()
    for spec in specs:
        if spec.kind == "micros":  # a timestamp column, not vectors
            stamps = pd.to_datetime(out[spec.column], utc=True)
            micros = stamps.dt.as_unit("us").astype("int64")  # floors; whatever unit the column has
            out[spec.name] = pd.Series(micros, index=out.index).where(stamps.notna())
            continue
        vectors = [_as_array(v) for v in out[spec.column]]
        if spec.kind == "cosine":
            assert spec.other is not None
            others = [_as_array(v) for v in out[spec.other]]
            out[spec.name] = [_cosine(a, b) for a, b in zip(vectors, others, strict=True)]
        elif spec.kind == "norm":
            scales = out[spec.scale] if spec.scale else pd.Series(1.0, index=out.index)
            out[spec.name] = [
                float(np.linalg.norm(v)) * float(s) if v is not None and s is not None else None
                for v, s in zip(vectors, scales, strict=True)
            ]
        else:
            out[spec.name] = [_reduce(spec.kind, v) for v in vectors]
    return out


def add_spark(df: DataFrame, specs: tuple[Derived, ...]) -> DataFrame:
    from pyspark.sql import functions as F

    for spec in specs:
        v = F.col(spec.column)
        if spec.kind == "micros":
            col = F.unix_micros(v)
        elif spec.kind == "dim":
            col = F.size(v)
        elif spec.kind == "finite":
            col = F.forall(v, lambda x: x.isNotNull() & ~F.isnan(x) & (F.abs(x) < float("inf")))
        elif spec.kind == "norm":
            col = F.sqrt(F.aggregate(v, F.lit(0.0), lambda acc, x: acc + x.cast("double") * x))
            col = col * F.col(spec.scale) if spec.scale else col
        elif spec.kind in ("min", "max"):
            col = F.array_min(v) if spec.kind == "min" else F.array_max(v)
        else:
            col = _spark_cosine(v, F.col(str(spec.other)))
        df = df.withColumn(spec.name, F.when(v.isNotNull(), col))
    return df


def with_derived(data: Any, specs: tuple[Derived, ...]) -> Any:
    """The batch (Spark or pandas) with the derived columns of `specs`."""
    return add_spark(data, specs) if is_spark(data) else add_pandas(data, specs)


def with_row_id(data: Any) -> Any:
    """Numbers the rows; on Spark the result is cached so that the row ids GX reports name the same rows
    the quarantine later selects (monotonically_increasing_id is only stable over one computation)."""
    if is_spark(data):
        from pyspark.sql import functions as F

        return data.withColumn(ROW_ID, F.monotonically_increasing_id()).cache()
    out = data.reset_index(drop=True)
    out[ROW_ID] = np.arange(len(out), dtype="int64")
    return out


def _spark_cosine(a: Any, b: Any) -> Any:
    from pyspark.sql import functions as F

    def dot(x: Any, y: Any) -> Any:
        pairs = F.arrays_zip(x.alias("x"), y.alias("y"))
        return F.aggregate(pairs, F.lit(0.0), lambda acc, p: acc + p["x"].cast("double") * p["y"])

    return dot(a, b) / (F.sqrt(dot(a, a)) * F.sqrt(dot(b, b)))


def _as_array(value: Any) -> np.ndarray | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return np.asarray(value, dtype="float64")


def _reduce(kind: Kind, v: np.ndarray | None) -> Any:
    if v is None:
        return None
    if kind == "dim":
        return int(v.size)
    if kind == "finite":
        return bool(np.isfinite(v).all())
    if v.size == 0:
        return None
    return float(v.min() if kind == "min" else v.max())


def _cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None or a.shape != b.shape:
        return None
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else None
