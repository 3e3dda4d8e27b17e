"""Behaviour sequences for BAHE: each user's time-ordered behaviour vectors, and where each CTR row's history
ends.

Notation: U users, N CTR rows, M behaviour events kept, V behaviour vectors, D their width (the split
layer).

A row at time t sees only the behaviours strictly before min(t, cut): train rows (t < cut) their own past,
valid and test rows the history before the cut, the same history the published user vector holds (the non-
hierarchical baseline's user text uses the same cut). The behaviour of the row itself (same time) never
enters: its text holds the rating, i.e. the label.

Bad input is reported, never dropped in silence: behaviour ids that user_behaviors references but the
behaviour table lacks are counted with examples (`MissingBehaviors`); users with no behaviour before the cut
are flagged (`no_history`) and get the model's fallback vector."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.models.ctr.data import CtrArrays
from llmfeat.reprs import ReprError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingBehaviors:
    """user_behaviors rows whose behaviour id has no vector at the split layer."""

    events: int  # referencing rows before the cut
    ids: int  # distinct behaviour ids
    users: int  # users affected
    examples: tuple[str, ...]

    def __str__(self) -> str:
        if not self.events:
            return "no missing behaviour vectors"
        return (
            f"{self.events:,} behaviour events ({self.ids:,} behaviour ids, {self.users:,} users) have no "
            f"vector in the behaviour table, e.g. behavior_id {list(self.examples)}: "
            "run `llmfeat bahe encode`"
        )


@dataclass(frozen=True)
class BehaviorSequences:
    vectors: np.ndarray  # (V, D) float32 behaviour vectors (split layer)
    offsets: np.ndarray  # (U + 1,) int64: user u's events are [offsets[u], offsets[u + 1])
    behavior: np.ndarray  # (M,) int64 index into vectors, oldest first per user
    time: np.ndarray  # (M,) int64 epoch micros
    cut: int  # epoch micros: nothing at or after it is in a sequence
    missing: MissingBehaviors
    missing_per_user: np.ndarray  # (U,) events before the cut dropped for want of a vector

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (U,)

    @property
    def no_history(self) -> np.ndarray:
        return self.lengths == 0  # (U,) bool: these users get the fallback vector

    def user_events(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

    def prefix_lengths(self, a: CtrArrays) -> np.ndarray:
        """(N,) behaviours strictly before min(row time, cut) per row, within the user's kept sequence."""
        out = np.zeros(len(a.user_idx), dtype=np.int64)
        t = np.minimum(a.timestamp, self.cut)
        order = np.argsort(a.user_idx, kind="stable")
        users, starts = np.unique(a.user_idx[order], return_index=True)
        for u, rows in zip(users, np.split(order, starts[1:]), strict=True):
            times = self.time[self.user_events(int(u))]
            out[rows] = np.searchsorted(times, t[rows], side="left")
        return out


def behavior_matrix(table: pa.Table, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """behaviors_repr -> (behaviour ids (V,), vectors (V, D)) at `layer`; ReprError on a bad table."""
    layers = sorted(set(table.column("layer").to_pylist()))
    if layer not in layers:
        raise ReprError(
            f"behaviors_repr has no layer {layer} (layers there: {layers}): run `llmfeat bahe encode`"
        )
    rows = table.filter(pc.equal(table.column("layer"), layer))
    keys = np.asarray(rows.column("behavior_id").to_pylist(), dtype=object)
    vectors = rows.column("vector").combine_chunks()
    lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    if len(keys) and (lengths != lengths[0]).any():
        bad = keys[int(np.flatnonzero(lengths != lengths[0])[0])]
        raise ReprError(f"behaviors_repr: behavior_id={bad!r} layer {layer}: vector width differs")
    width = int(lengths[0]) if len(keys) else 0
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(keys), width)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise ReprError(f"behaviors_repr: behavior_id={keys[int(np.flatnonzero(~finite)[0])]!r}: NaN or inf")
    return keys, matrix


def behavior_sequences(
    user_behaviors: pa.Table,
    behavior_keys: np.ndarray,
    vectors: np.ndarray,
    user_keys: np.ndarray,
    cut: int,
    max_behaviors: int = 1024,
) -> BehaviorSequences:
    """Events (user_id, behavior_id, event_timestamp) before `cut` -> per-user sequences, oldest first.

    Ties in time are ordered by behaviour id; only the newest `max_behaviors` events of a user are kept.
    """
    b_pos = {k: i for i, k in enumerate(behavior_keys)}
    u_pos = {k: i for i, k in enumerate(user_keys)}
    ts = pc.cast(user_behaviors.column("event_timestamp"), pa.int64()).to_numpy()
    before = ts < cut
    users = np.asarray(user_behaviors.column("user_id").to_pylist(), dtype=object)[before]
    bids = np.asarray(user_behaviors.column("behavior_id").to_pylist(), dtype=object)[before]
    ts = ts[before]
    b_idx = np.array([b_pos.get(b, -1) for b in bids], dtype=np.int64)
    u_idx = np.array([u_pos.get(u, -1) for u in users], dtype=np.int64)
    lost = b_idx < 0
    missing = MissingBehaviors(
        int(lost.sum()),
        len(set(bids[lost])),
        len(set(users[lost])),
        tuple(sorted(set(bids[lost]))[:3]),
    )
    if missing.events:
        log.warning("BAHE: %s", missing)
    missing_per_user = np.bincount(u_idx[lost & (u_idx >= 0)], minlength=len(user_keys)).astype(np.int64)
    keep = ~lost & (u_idx >= 0)
    u_idx, b_idx, ts, bids = u_idx[keep], b_idx[keep], ts[keep], bids[keep]
    order = np.lexsort((bids.astype(str), ts, u_idx))  # by user, then time, then behaviour id
    u_idx, b_idx, ts = u_idx[order], b_idx[order], ts[order]
    counts = np.bincount(u_idx, minlength=len(user_keys))
    ends = np.cumsum(counts)
    rank_from_end = ends[u_idx] - np.arange(len(u_idx))  # 1 = the user's newest event
    kept = rank_from_end <= max_behaviors
    u_idx, b_idx, ts = u_idx[kept], b_idx[kept], ts[kept]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u_idx, minlength=len(user_keys)))]).astype(np.int64)
    return BehaviorSequences(
        vectors.astype(np.float32), offsets, b_idx, ts, int(cut), missing, missing_per_user
    )


def padded_batch(seqs: BehaviorSequences, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Users (B,) -> behaviour vectors (B, T, D) right-padded with zeros and the mask (B, T); T >= 1."""
    lengths = seqs.lengths[users]
    t = max(1, int(lengths.max()) if len(users) else 1)
    x = np.zeros((len(users), t, seqs.vectors.shape[1]), dtype=np.float32)
    mask = np.zeros((len(users), t), dtype=bool)
    for row, u in enumerate(users):
        events = seqs.behavior[seqs.user_events(int(u))]
        x[row, : len(events)] = seqs.vectors[events]
        mask[row, : len(events)] = True
    return x, mask


def length_batches(lengths: np.ndarray, users: np.ndarray, position_budget: int) -> list[np.ndarray]:
    """Users packed into batches of at most `position_budget` padded positions, longest first."""
    order = users[np.argsort(-lengths[users], kind="stable")]
    out, start = [], 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        size = max(1, position_budget // longest)
        out.append(order[start : start + size])
        start += size
    return out
