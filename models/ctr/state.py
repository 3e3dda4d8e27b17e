"""Fresh state of a user (or an item) from its events: one pure update, called by the batch job and online.

Notation: D the width of the item representation (0 for an item's counters), k the events of one entity at
one timestamp. A state holds every event up to and including its newest timestamp; the job stamps its row
1 microsecond after that time, so a point-in-time join gives a row the state of strictly earlier events.

What a state holds, and why:
- counts of events, liked (label 1) and disliked (label 0) ones;
- a like rate smoothed toward the fit period's base rate (`prior_weight` pseudo-events at `base_rate`), so
  a user with two events is not at 0 or 1;
- the mean of the liked items' vectors and of the disliked ones' (a user's taste in the item space of one
  representation: the candidate's cosine with each is computed at ranking time);
- with `half_life_s` > 0, the same means weighted by recency (each event's weight halves every half-life).

Events at one timestamp are applied together, in any order: the result does not depend on it. An update
older than the state's newest event is refused (`StateOrderError`); an equal timestamp is applied. An item's
counters take events in any order (`ordered=False`): counts commute, and an item hears from many users at
once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llmfeat.errors import UserError
from llmfeat.reprs import ITEM_STATE_COLUMNS, USER_STATE_COLUMNS


class StateOrderError(UserError, ValueError):
    """Events older than what the state already holds: applying them would rewrite the past."""


@dataclass(frozen=True)
class StateConfig:
    base_rate: float = 0.5  # the fit period's like rate (the job measures it)
    prior_weight: float = 10.0  # pseudo-events at base_rate in the smoothed like rate
    half_life_s: float = 0.0  # > 0: recency-weighted means as well


@dataclass(frozen=True)
class State:
    """Sums, not means, so that an update is a vector add; `means` gives what is served."""

    newest_us: int = -1  # epoch microseconds of the newest event held; -1: none
    event_count: int = 0
    liked_count: int = 0
    liked_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (D,) float64
    disliked_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    liked_decayed: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (D,) recency-weighted sums
    disliked_decayed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    liked_weight: float = 0.0  # recency weights of those sums, as of newest_us
    disliked_weight: float = 0.0

    @property
    def disliked_count(self) -> int:
        return self.event_count - self.liked_count

    def like_rate(self, cfg: StateConfig) -> float:
        return (self.liked_count + cfg.prior_weight * cfg.base_rate) / (self.event_count + cfg.prior_weight)

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(D,) float32 means of the liked and the disliked items' vectors; zeros where there are none."""
        return _mean(self.liked_sum, self.liked_count), _mean(self.disliked_sum, self.disliked_count)

    def recent_means(self) -> tuple[np.ndarray, np.ndarray]:
        return _mean(self.liked_decayed, self.liked_weight), _mean(
            self.disliked_decayed, self.disliked_weight
        )


def _mean(total: np.ndarray, weight: float) -> np.ndarray:
    return (total / weight if weight > 0 else np.zeros_like(total)).astype(np.float32)


def empty(dim: int) -> State:
    z = np.zeros(dim)
    return State(liked_sum=z, disliked_sum=z, liked_decayed=z, disliked_decayed=z)


def update(
    state: State,
    at_us: int,
    labels: np.ndarray,
    vectors: np.ndarray,
    cfg: StateConfig,
    ordered: bool = True,
) -> State:
    """The state after the events of one entity at one time `at_us`: labels (k,) in {0, 1}, vectors (k, D)
    the items' vectors (D = 0 for counters; a zero row for an item without a vector)."""
    if not ordered:
        at_us = max(at_us, state.newest_us)
    elif at_us < state.newest_us:
        raise StateOrderError(
            f"event at {at_us} us is older than the newest event the state holds ({state.newest_us} us)"
        )
    labels = np.asarray(labels).astype(bool)
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(labels), -1)
    liked, disliked = vectors[labels].sum(axis=0), vectors[~labels].sum(axis=0)
    n_liked = int(labels.sum())
    decay = 1.0
    if cfg.half_life_s > 0 and state.newest_us >= 0:
        decay = 0.5 ** ((at_us - state.newest_us) / (cfg.half_life_s * 1e6))
    return replace(
        state,
        newest_us=at_us,
        event_count=state.event_count + len(labels),
        liked_count=state.liked_count + n_liked,
        liked_sum=state.liked_sum + liked,
        disliked_sum=state.disliked_sum + disliked,
        liked_decayed=state.liked_decayed * decay + liked,
        disliked_decayed=state.disliked_decayed * decay + disliked,
        liked_weight=state.liked_weight * decay + n_liked,
        disliked_weight=state.disliked_weight * decay + (len(labels) - n_liked),
    )


def to_row(state: State, cfg: StateConfig) -> dict[str, Any]:
    """The served columns (`USER_STATE_COLUMNS`) of a state."""
    liked, disliked = state.means()
    liked_recent, disliked_recent = state.recent_means()
    values = (
        state.event_count, state.liked_count, state.disliked_count, state.like_rate(cfg), liked, disliked,
        liked_recent, disliked_recent, state.liked_weight, state.disliked_weight, state.newest_us,
    )  # fmt: skip
    return dict(zip(USER_STATE_COLUMNS, values, strict=True))


def from_row(row: Mapping[str, Any]) -> State:
    """The state a stored row holds (what the online path continues from): sums are the means times their
    counts or weights, so an update of the row equals the update of the state that wrote it."""
    liked, disliked = (np.asarray(row[c], dtype=np.float64) for c in ("liked_mean", "disliked_mean"))
    recent = [np.asarray(row[c], dtype=np.float64) for c in ("liked_recent_mean", "disliked_recent_mean")]
    weights = float(row["liked_recent_weight"]), float(row["disliked_recent_weight"])
    return State(
        newest_us=int(row["newest_event_us"]),
        event_count=int(row["event_count"]),
        liked_count=int(row["liked_count"]),
        liked_sum=liked * int(row["liked_count"]),
        disliked_sum=disliked * int(row["disliked_count"]),
        liked_decayed=recent[0] * weights[0],
        disliked_decayed=recent[1] * weights[1],
        liked_weight=weights[0],
        disliked_weight=weights[1],
    )


def item_row(state: State) -> dict[str, Any]:
    """An item's served counters (`ITEM_STATE_COLUMNS`): impressions, clicks, newest event."""
    return dict(zip(ITEM_STATE_COLUMNS, (state.event_count, state.liked_count, state.newest_us), strict=True))


def item_from_row(row: Mapping[str, Any]) -> State:
    count, liked, newest = (int(row[c]) for c in ITEM_STATE_COLUMNS)
    return replace(empty(0), newest_us=newest, event_count=count, liked_count=liked)
