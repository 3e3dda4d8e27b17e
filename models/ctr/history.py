"""Point-in-time history features for the non-LLM and LLM history arms of the CTR ablation.

Notation: N rows, I items, D vector width. A row's history is its user's interactions on earlier days only
(the same cut as the counters), split by label: the mean of a per-item vector over liked items and over
disliked items, zeros where there are none. With genre multi-hots this is a content history without an LLM;
with item-id embeddings an id history (the pooled-embedding half of DIN); with LLM item vectors the LLM's
history of the user.
"""

from __future__ import annotations

import numpy as np


def history_means(
    users: np.ndarray, items: np.ndarray, days: np.ndarray, labels: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """users, items (N,) int indices, days (N,) int day numbers, labels (N,) {0, 1}, vectors (I, D) ->
    (N, 2D): [mean over liked items, mean over disliked items] of the user's earlier days."""
    n, d = len(users), vectors.shape[1]
    out = np.zeros((n, 2 * d), dtype=np.float32)
    order = np.lexsort((days, users))
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        sums = np.zeros((2, d), dtype=np.float64)  # liked, disliked
        counts = np.zeros(2)
        day_ends = np.flatnonzero(np.diff(days[rows])) + 1
        for group in np.split(rows, day_ends):  # one day of this user: sees the days before only
            mean = sums / np.maximum(counts, 1)[:, None]
            out[group] = mean.reshape(-1)
            for lab, slot in ((1, 0), (0, 1)):
                chosen = group[labels[group] == lab]
                sums[slot] += vectors[items[chosen]].sum(axis=0)
                counts[slot] += len(chosen)
    return out
