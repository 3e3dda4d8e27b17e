"""Point-in-time counters and histories for the CTR ablation, at either freshness.

Notation: N rows, I items, D vector width. `times` is any integer clock: day numbers give the daily
protocol (a row sees its user's earlier days, like the daily counters), epoch microseconds the fresh one (a
row sees strictly earlier events, like the event-time state of models/ctr/state.py: events at the row's own
time, its own included, are never seen). A history is the mean of a per-item vector over the liked items and
over the disliked items, zeros where there are none. With genre multi-hots this is a content history without
an LLM; with item-id embeddings an id history (the pooled-embedding half of DIN); with LLM item vectors the
LLM's history of the user.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DAY_US = 86_400_000_000  # microseconds in a day: epoch microseconds // DAY_US is the UTC day number


def epoch_micros(timestamps: pd.Series) -> np.ndarray:
    """(N,) int64 epoch microseconds of a timestamp column, whatever unit the table stores it in."""
    since = pd.to_datetime(timestamps, utc=True) - pd.Timestamp(0, tz="UTC")
    return (since // pd.Timedelta(1, "us")).to_numpy(np.int64)


def earlier_counts(keys: np.ndarray, times: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keys (N,) int (a user's or an item's index), times (N,) int, labels (N,) {0, 1} -> (events, liked),
    each (N,) int64: the key's events at strictly earlier times, and how many of them were liked."""
    order = np.lexsort((times, keys))
    k, t, lab = keys[order], times[order], labels[order].astype(np.int64)
    n = len(k)
    idx = np.arange(n)
    new_key = np.r_[True, k[1:] != k[:-1]] if n else np.zeros(0, bool)
    new_time = new_key | np.r_[True, t[1:] != t[:-1]] if n else np.zeros(0, bool)
    key_start = np.maximum.accumulate(np.where(new_key, idx, 0))  # first row of the row's key
    time_start = np.maximum.accumulate(np.where(new_time, idx, 0))  # first row of its (key, time)
    liked_before = np.r_[0, np.cumsum(lab)][:n]  # liked rows before this one in the sorted order
    events, liked = np.empty(n, np.int64), np.empty(n, np.int64)
    events[order] = time_start - key_start
    liked[order] = liked_before[time_start] - liked_before[key_start]
    return events, liked


def history_means(
    users: np.ndarray, items: np.ndarray, days: np.ndarray, labels: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """users, items (N,) int indices, days (N,) int clock (day numbers or microseconds), labels (N,)
    {0, 1}, vectors (I, D) -> (N, 2D): [mean over liked items, mean over disliked items] of the user's
    events at strictly earlier times."""
    n, d = len(users), vectors.shape[1]
    out = np.zeros((n, 2 * d), dtype=np.float32)
    order = np.lexsort((days, users))
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        sums = np.zeros((2, d), dtype=np.float64)  # liked, disliked
        counts = np.zeros(2)
        day_ends = np.flatnonzero(np.diff(days[rows])) + 1
        for group in np.split(rows, day_ends):  # one time of this user: sees the times before only
            mean = sums / np.maximum(counts, 1)[:, None]
            out[group] = mean.reshape(-1)
            for lab, slot in ((1, 0), (0, 1)):
                chosen = group[labels[group] == lab]
                sums[slot] += vectors[items[chosen]].sum(axis=0)
                counts[slot] += len(chosen)
    return out
