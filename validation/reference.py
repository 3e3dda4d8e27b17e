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
    frame = with_derived(reference.select("layer", vector) if is_spark(reference) else reference, (norm,))
    if is_spark(frame):
        frame = frame.select("layer", norm.name).toPandas()
    out = {}
    for layer, norms in frame.groupby("layer")[norm.name]:
        lo, hi = np.nanquantile(norms.astype("float64"), quantiles)
        out[int(layer)] = (float(lo) / slack, float(hi) * slack)
    return out
