"""Arrays for the CTR probe and the MARC trainer, from the Delta tables (no Spark needed at this size).

Notation: N interaction rows, U users, I items, D representation width, F dense ID-side features.

Leakage rule (docs/methods.md): the user representation is encoded from the user's history before the train
cut, so it contains the labels of the train rows. The downstream probe is therefore fitted only on rows after
that cut (the valid split) and tested on the test split; the ID side is learned from the train split alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.reprs import ReprError


@dataclass(frozen=True)
class CtrArrays:
    user_keys: np.ndarray  # (U,) str
    item_keys: np.ndarray  # (I,) str
    user_idx: np.ndarray  # (N,) int64
    item_idx: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) float32
    split: np.ndarray  # (N,) str: train / valid / test
    timestamp: np.ndarray  # (N,) int64 epoch micros
    dense: np.ndarray  # (N, F) float32 ID-side features from the train split
    warm: np.ndarray  # (N,) bool: the user has train-period history

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def ctr_arrays(interactions: pa.Table, users: pa.Table, items: pa.Table, prior: float = 10.0) -> CtrArrays:
    """Index users and items, and compute train-period counts and smoothed click rates (the ID side)."""
    user_keys = np.asarray(users.column("user_id").to_pylist(), dtype=object)
    item_keys = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    u_pos = {k: i for i, k in enumerate(user_keys)}
    i_pos = {k: i for i, k in enumerate(item_keys)}
    user_idx = np.array([u_pos[k] for k in interactions.column("user_id").to_pylist()], dtype=np.int64)
    item_idx = np.array([i_pos[k] for k in interactions.column("item_id").to_pylist()], dtype=np.int64)
    label = interactions.column("label").to_numpy().astype(np.float32)
    split = np.asarray(interactions.column("split").to_pylist(), dtype=object)
    ts = pc.cast(interactions.column("event_timestamp"), pa.int64()).to_numpy()
    train = split == "train"
    base = float(label[train].mean())

    def counts(idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = np.bincount(idx[train], minlength=n).astype(np.float64)
        pos = np.bincount(idx[train], weights=label[train], minlength=n)
        return c, (pos + prior * base) / (c + prior)

    ic, ictr = counts(item_idx, len(item_keys))
    uc, uctr = counts(user_idx, len(user_keys))
    warm = uc[user_idx] > 0
    dense = np.stack(
        [np.log1p(ic[item_idx]), ictr[item_idx], np.log1p(uc[user_idx]), uctr[user_idx], warm], axis=1
    ).astype(np.float32)
    return CtrArrays(user_keys, item_keys, user_idx, item_idx, label, split, ts, dense, warm)


def point_in_time(
    a: CtrArrays, snapshot_keys: np.ndarray, snapshot_users: np.ndarray, snapshot_times: np.ndarray
) -> CtrArrays:
    """The same rows with the user side replaced by user snapshots: user_keys = snapshot keys (S,), user_idx
    = each row's user's newest snapshot at or before the row's time (a snapshot's text holds only earlier
    behaviour, so a row never sees its own label). snapshot_times: epoch micros; ReprError when a row has
    none."""
    order = np.lexsort((snapshot_times, snapshot_users))  # by user, then time
    users, times = snapshot_users[order], snapshot_times[order]
    row_users = a.user_keys[a.user_idx]
    idx = np.empty(len(row_users), dtype=np.int64)
    starts = {u: i for i, u in reversed(list(enumerate(users)))}
    ends = {u: i + 1 for i, u in enumerate(users)}
    for r, (u, t) in enumerate(zip(row_users, a.timestamp, strict=True)):
        lo, hi = starts.get(u, 0), ends.get(u, 0)
        j = lo + int(np.searchsorted(times[lo:hi], t, side="right")) - 1
        if hi == lo or j < lo:
            raise ReprError(f"user_id={u!r}: no snapshot at or before its interaction at {t} (epoch us)")
        idx[r] = order[j]
    return replace(a, user_keys=snapshot_keys, user_idx=idx)
