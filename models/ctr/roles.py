"""Which rows of a streamed training set play which part, decided from two cut times without holding rows.

In memory, `split_masks` (spark_jobs/training_set.py) and `after_marc` (models/ctr/train.py) take quantiles of
the timestamps of a frame. A stream never holds the table, so the same quantiles are found exactly by a few
passes over one column (`quantile`: each pass narrows a window of values 65,536-fold, with a histogram), and
the roles of any batch follow from the two cuts (`RowRoles.mask`):
- fit: the train split and the valid split before `valid_cut`; valid: the valid split from `valid_cut` on
  (early stopping, valid metrics); test: the test split; train: the train split (the base click rate);
- residual: the fit rows from `after_cut` on, after the periods MARC was fitted and stopped on, the only rows
  the LLM branch learns from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from llmfeat.models.ctr.history import epoch_micros

Role = Literal["fit", "valid", "test", "train", "residual"]
ROLE_COLUMNS = ("split", "event_timestamp")  # what a role reads from a row
BINS = 1 << 16  # a window of values narrows this many times per pass

# One pass over the values of a column: (N,) int64 arrays, batch by batch, the same values on every call.
Scan = Callable[[], Iterable[np.ndarray]]


@dataclass(frozen=True)
class RowRoles:
    valid_cut: float  # epoch microseconds; inf: no valid rows
    after_cut: float = -math.inf  # epoch microseconds; -inf: every fit row is a residual row

    def mask(self, batch: pa.RecordBatch | pa.Table, role: Role) -> np.ndarray:
        """(B,) bool: the rows of the batch (with ROLE_COLUMNS) that play `role`."""
        split = np.asarray(batch.column("split").to_pylist(), dtype=object)
        ts = epoch_micros(batch.column("event_timestamp").to_pandas())
        train, valid = split == "train", split == "valid"
        late = valid & (ts >= self.valid_cut)
        masks = {
            "fit": train | (valid & ~late),
            "valid": late,
            "test": split == "test",
            "train": train,
        }
        if role == "residual":
            return masks["fit"] & (ts >= self.after_cut)
        return masks[role]


def quantile(scan: Scan, q: float) -> float:
    """np.quantile (linear) of every value the scan gives, exactly, holding one histogram at a time; nan when
    there is none."""
    n, lo, hi = 0, None, None
    for v in scan():
        if len(v):
            n += len(v)
            lo = int(v.min()) if lo is None else min(lo, int(v.min()))
            hi = int(v.max()) if hi is None else max(hi, int(v.max()))
    if lo is None or hi is None:
        return math.nan
    virtual = (n - 1) * q  # numpy's virtual index and interpolation (method "linear")
    below = min(max(math.floor(virtual), 0), n - 1)
    above = min(below + 1, n - 1)
    gamma = min(max(virtual - below, 0.0), 1.0)
    a, b = order_statistics(scan, [below, above], lo, hi)
    return lerp(np.int64(a), np.int64(b), np.float64(gamma))


def lerp(a: np.int64, b: np.int64, t: np.float64) -> float:
    """numpy's quantile interpolation, step for step (so the cut equals np.quantile's to the last bit)."""
    diff = b - a  # exact, in integers
    return float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t)


def order_statistics(scan: Scan, ranks: list[int], lo: int, hi: int) -> list[int]:
    """The values at 0-based `ranks` in sorted order of every value in [lo, hi] the scan gives: each rank's
    window [lo, hi] shrinks to the histogram bin holding it, pass after pass, until it is one value."""
    windows = {r: (lo, hi, r) for r in set(ranks)}  # rank -> (window lo, window hi, rank inside the window)
    while any(w_lo < w_hi for w_lo, w_hi, _ in windows.values()):
        open_ = {r: w for r, w in windows.items() if w[0] < w[1]}
        widths = {r: (w_hi - w_lo) // BINS + 1 for r, (w_lo, w_hi, _) in open_.items()}
        counts = {r: np.zeros(BINS, np.int64) for r in open_}
        for v in scan():
            for r, (w_lo, w_hi, _) in open_.items():
                inside = v[(v >= w_lo) & (v <= w_hi)]
                counts[r] += np.bincount((inside - w_lo) // widths[r], minlength=BINS)
        for r, (w_lo, w_hi, k) in open_.items():
            cum = np.cumsum(counts[r])
            b = int(np.searchsorted(cum, k, side="right"))  # the bin holding the k-th value
            start = w_lo + b * widths[r]
            windows[r] = (start, min(w_hi, start + widths[r] - 1), k - (int(cum[b - 1]) if b else 0))
    return [windows[r][0] for r in ranks]


def role_times(batches: Callable[[], Iterator[pa.RecordBatch]], split: str) -> Scan:
    """A scan of the epoch microseconds of one split's rows, from batches with ROLE_COLUMNS."""

    def scan() -> Iterator[np.ndarray]:
        for batch in batches():
            keep = np.asarray(batch.column("split").to_pylist(), dtype=object) == split
            yield epoch_micros(batch.column("event_timestamp").to_pandas())[keep]

    return scan


def row_roles(
    batches: Callable[[], Iterator[pa.RecordBatch]],
    stop_frac: float,
    after_frac: float | None = None,
) -> RowRoles:
    """The cuts of a training set read as `batches()` (ROLE_COLUMNS at least), as split_masks(frame,
    stop_frac) and, with `after_frac` (marc.fit_frac + marc.stop_frac), after_marc give them in memory."""
    valid_cut = quantile(role_times(batches, "valid"), 1 - stop_frac)
    after_cut = -math.inf
    if after_frac is not None:
        after_cut = quantile(role_times(batches, "train"), min(after_frac, 1.0))
    return RowRoles(math.inf if math.isnan(valid_cut) else valid_cut, after_cut)
