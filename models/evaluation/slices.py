"""Row slices for CTR comparisons: where a difference comes from, by what was known before each row.

Notation: N rows, each with its user and item (int indices), its time in epoch microseconds and its
label. Counts are of strictly earlier events (models/ctr/history.py), so a row's slice never
depends on its own label.
- items by their events before the row: 0, 1-4, 5-19, 20+ (new items, where content should pay);
- users by what came before: their first event, earlier events that day only (the daily snapshot does not
  have them yet), earlier days.
"""

from __future__ import annotations

import numpy as np

from llmfeat.models.ctr.history import DAY_US, earlier_counts

ITEM_BINS = (("item events 0", 0, 0), ("item events 1-4", 1, 4), ("item events 5-19", 5, 19),
             ("item events 20+", 20, np.inf))  # fmt: skip


def history_slices(
    user: np.ndarray, item: np.ndarray, micros: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """name -> (N,) bool, "all" first."""
    item_events, _ = earlier_counts(item, micros, labels)
    user_events, _ = earlier_counts(user, micros, labels)
    user_days, _ = earlier_counts(user, micros // DAY_US, labels)
    out = {"all": np.ones(len(user), bool)}
    for name, lo, hi in ITEM_BINS:
        out[name] = (item_events >= lo) & (item_events <= hi)
    out["user: first event"] = user_events == 0
    out["user: earlier events that day"] = (user_events > 0) & (user_days == 0)
    out["user: earlier days"] = user_days > 0
    return out
