"""Bounds taken from a reference run: the per-layer L2 norms a representation table is expected to keep."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmfeat.validation.derived import Derived, is_spark, with_derived


def norm_bounds_from(
    reference: Any,
    vector: str = "vector",
    slack: float = 2.0,
    quantiles: tuple[float, float] = (0.001, 0.999),
) -> dict[int, tuple[float, float]]:
    """layer -> (low quantile / slack, high quantile * slack) of the vector norms in `reference`.

    `reference` is a published version of the same table (Spark or pandas) encoded with the same encoder.
    """
    norm = Derived("norm", vector)
    if is_spark(reference):
        return _spark_bounds(reference, norm, slack, quantiles)
    frame = with_derived(reference, (norm,))
    out = {}
    for layer, norms in frame.groupby("layer")[norm.name]:
        lo, hi = np.nanquantile(norms.astype("float64"), quantiles)
        out[int(layer)] = (float(lo) / slack, float(hi) * slack)
    return out


def _spark_bounds(
    reference: Any, norm: Derived, slack: float, quantiles: tuple[float, float]
) -> dict[int, tuple[float, float]]:
    """The same bounds computed on the executors: exact percentiles (linear, as numpy) per layer, NaN left
    out; one row per layer reaches the driver."""
    from pyspark.sql import functions as F

    norms = with_derived(reference.select("layer", norm.column), (norm,)).select("layer", norm.name)
    value = F.col(norm.name).cast("double")
    rows = (
        norms.where(value.isNotNull() & ~F.isnan(value))
        .groupBy("layer")
        .agg(F.percentile(value, list(quantiles)).alias("q"))
        .collect()
    )
    return {int(r["layer"]): (float(r["q"][0]) / slack, float(r["q"][1]) * slack) for r in sorted(rows)}
