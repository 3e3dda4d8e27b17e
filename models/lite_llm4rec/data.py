"""Next-item data on the time split: per-user item sequences, training windows and evaluation queries.

Notation: I items (indexed 1..I; 0 is padding), E events, S = max_seq, W training windows, Q queries.

Events are ordered by (user, timestamp, item). A training window is a slice of one user's train-split events:
inputs are items t..t+S-1, targets the items one step later (next-item prediction at every position). A query
is one event of the evaluated split: its history is the user's events before it in that order, whatever their
split (inputs only, never labels of later rows); its target is the event's item. The model reads the newest S
items of that history; the ranking excludes ALL of it (`Queries.seen`, the user's whole history before the
query), so an item rated long before the window never counts as a recommendation. Queries with an empty
history are skipped (counted in `skipped_empty`); a query's user is warm when it has train-split events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmfeat.models.evaluation.rank_metrics import ItemSets

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class EventLog:
    item_keys: np.ndarray  # (I,) str: item index i + 1 <-> item_keys[i]
    user_keys: np.ndarray  # (U,) str
    user: np.ndarray  # (E,) int64 user index, events sorted by (user, time, item)
    item: np.ndarray  # (E,) int64 item index in 1..I
    split: np.ndarray  # (E,) str

    @property
    def n_items(self) -> int:
        return len(self.item_keys)

    def train_counts(self) -> np.ndarray:
        """(I + 1,) train-split event count per item index (index 0, padding, counts 0)."""
        return np.bincount(self.item[self.split == "train"], minlength=self.n_items + 1).astype(np.float64)


@dataclass(frozen=True)
class Windows:
    inputs: np.ndarray  # (W, S) int64, left padded with 0
    targets: np.ndarray  # (W, S) int64, 0 where there is no target


@dataclass(frozen=True)
class Queries:
    history: np.ndarray  # (Q, S) int64, left padded with 0; the newest item is last
    target: np.ndarray  # (Q,) int64 item index
    user: np.ndarray  # (Q,) int64 user index
    warm: np.ndarray  # (Q,) bool: the user has train-split events
    seen: ItemSets  # Q sets: the user's whole history before the query, excluded from the ranking
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.target)

    def take(self, keep: np.ndarray) -> Queries:
        """The queries at indices `keep`, in that order."""
        return Queries(self.history[keep], self.target[keep], self.user[keep], self.warm[keep],
                       self.seen.take(keep), self.skipped_empty)  # fmt: skip


def event_log(interactions: pa.Table, items: pa.Table) -> EventLog:
    """Interactions (user_id, item_id, event_timestamp, split) and the items table -> a sorted EventLog."""
    import pyarrow as pa
    import pyarrow.compute as pc

    item_keys = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    pos = {k: i + 1 for i, k in enumerate(item_keys)}
    users = np.asarray(interactions.column("user_id").to_pylist(), dtype=object)
    user_keys, user = np.unique(users, return_inverse=True)
    item = np.array([pos[k] for k in interactions.column("item_id").to_pylist()], dtype=np.int64)
    ts = pc.cast(interactions.column("event_timestamp"), pa.int64()).to_numpy()
    split = np.asarray(interactions.column("split").to_pylist(), dtype=object)
    order = np.lexsort((item, ts, user))
    return EventLog(item_keys, user_keys, user[order].astype(np.int64), item[order], split[order])


def _user_bounds(log: EventLog) -> list[tuple[int, int]]:
    starts = np.flatnonzero(np.r_[True, log.user[1:] != log.user[:-1]])
    ends = np.r_[starts[1:], len(log.user)]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    seq = seq[-length:]
    if len(seq):
        out[length - len(seq) :] = seq
    return out


def train_windows(log: EventLog, max_seq: int, split: str = "train") -> Windows:
    """Each user's `split` events cut into windows of S + 1 items from the newest backwards."""
    inputs, targets = [], []
    for a, b in _user_bounds(log):
        seq = log.item[a:b][log.split[a:b] == split]
        end = len(seq)
        while end >= 2:
            chunk = seq[max(0, end - max_seq - 1) : end]  # up to S + 1 items
            inputs.append(left_pad(chunk[:-1], max_seq))
            targets.append(left_pad(chunk[1:], max_seq))
            end -= max_seq
    if not inputs:
        empty = np.zeros((0, max_seq), dtype=np.int64)
        return Windows(empty, empty)
    return Windows(np.stack(inputs), np.stack(targets))


def eval_queries(log: EventLog, split: str, max_seq: int) -> Queries:
    """One query per `split` event with a non-empty history of the user's earlier events: the newest S as
    the model's input, all of them as the items the ranking excludes."""
    hist, seen, target, user, warm, skipped = [], [], [], [], [], 0
    for a, b in _user_bounds(log):
        items, splits = log.item[a:b], log.split[a:b]
        is_warm = bool((splits == "train").any())
        for j in np.flatnonzero(splits == split):
            if j == 0:
                skipped += 1
                continue
            hist.append(left_pad(items[:j], max_seq))
            seen.append(items[:j])
            target.append(items[j])
            user.append(log.user[a])
            warm.append(is_warm)
    if not hist:
        return Queries(np.zeros((0, max_seq), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                       np.zeros(0, bool), ItemSets.from_lists([]), skipped)  # fmt: skip
    sets = ItemSets.from_lists(seen)
    return Queries(np.stack(hist), np.array(target), np.array(user), np.array(warm), sets, skipped)


def user_histories(log: EventLog, max_seq: int) -> tuple[np.ndarray, np.ndarray, ItemSets]:
    """Every user's newest S items over all splits and their whole history: (user indices (U',),
    input windows (U', S), every item each user has (U' sets))."""
    users, hist, seen = [], [], []
    for a, b in _user_bounds(log):
        users.append(log.user[a])
        hist.append(left_pad(log.item[a:b], max_seq))
        seen.append(log.item[a:b])
    return np.array(users, dtype=np.int64), np.stack(hist), ItemSets.from_lists(seen)


@dataclass(frozen=True)
class LiteData:
    """Everything the next-item models train and are ranked on."""

    log: EventLog
    windows: Windows
    valid: Queries
    test: Queries
    item_vectors: np.ndarray  # (I, H) float32, in item index order
    lineage: dict[str, Any]
