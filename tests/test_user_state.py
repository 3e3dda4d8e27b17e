"""The fresh-state update: one pure function, exact against a direct computation, order-free within a time."""

from __future__ import annotations

import numpy as np
import pytest

from llmfeat.models.ctr.state import State, StateConfig, StateOrderError, empty, update

pytestmark = pytest.mark.unit

CFG = StateConfig(base_rate=0.6, prior_weight=4.0, half_life_s=3600.0)


def replay(times: np.ndarray, labels: np.ndarray, vectors: np.ndarray, cfg: StateConfig = CFG) -> State:
    state = empty(vectors.shape[1])
    for t in np.unique(times):
        at = times == t
        state = update(state, int(t), labels[at], vectors[at], cfg)
    return state


def test_state_equals_the_direct_means_counts_and_smoothed_rate() -> None:
    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(0, 10, 40)) * 1_000_000
    labels, vectors = rng.integers(0, 2, 40), rng.normal(size=(40, 5))
    state = replay(times, labels, vectors)
    liked, disliked = state.means()
    np.testing.assert_allclose(liked, vectors[labels == 1].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(disliked, vectors[labels == 0].mean(axis=0), rtol=1e-6)
    assert (state.event_count, state.liked_count, state.disliked_count) == (
        40,
        labels.sum(),
        40 - labels.sum(),
    )
    assert state.like_rate(CFG) == pytest.approx((labels.sum() + 4 * 0.6) / (40 + 4))
    assert state.newest_us == times[-1]


def test_events_at_one_time_apply_together_in_any_order() -> None:
    rng = np.random.default_rng(1)
    labels, vectors = rng.integers(0, 2, 6), rng.normal(size=(6, 3))
    a = update(empty(3), 5, labels, vectors, CFG)
    flip = np.arange(6)[::-1]
    b = update(empty(3), 5, labels[flip], vectors[flip], CFG)
    for x, y in zip(a.means() + a.recent_means(), b.means() + b.recent_means(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12)


def test_recency_weights_halve_every_half_life() -> None:
    old, new = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    state = update(empty(2), 0, np.array([1]), old, CFG)
    state = update(state, int(3600e6), np.array([1]), new, CFG)  # one half-life later: weights 0.5 and 1
    np.testing.assert_allclose(state.recent_means()[0], [0.5 / 1.5, 1 / 1.5], rtol=1e-6)
    np.testing.assert_allclose(state.means()[0], [0.5, 0.5])


def test_an_older_event_is_refused_and_an_equal_time_applied() -> None:
    state = update(empty(0), 10, np.array([1]), np.zeros((1, 0)), CFG)  # an item's counters: no vectors
    assert update(state, 10, np.array([0]), np.zeros((1, 0)), CFG).event_count == 2
    with pytest.raises(StateOrderError, match="older"):
        update(state, 9, np.array([0]), np.zeros((1, 0)), CFG)


def test_an_empty_state_serves_zeros_and_the_base_rate() -> None:
    state = empty(4)
    assert not state.means()[0].any() and state.like_rate(CFG) == pytest.approx(0.6)


def test_a_state_continued_from_its_stored_row_equals_the_uninterrupted_one() -> None:
    """What the online path does: read the newest row, apply the new events, store the row again."""
    from llmfeat.models.ctr.state import from_row, to_row

    rng = np.random.default_rng(2)
    times = np.sort(rng.integers(0, 50, 60)) * 60_000_000
    labels, vectors = rng.integers(0, 2, 60), rng.normal(size=(60, 8))
    whole = to_row(replay(times, labels, vectors), CFG)
    cut = times < times[30]
    state = from_row(to_row(replay(times[cut], labels[cut], vectors[cut]), CFG))
    for t in np.unique(times[~cut]):  # event time by event time, each from the row the last one stored
        at = times == t
        state = from_row(to_row(update(state, int(t), labels[at], vectors[at], CFG), CFG))
    online = to_row(state, CFG)
    for column, value in whole.items():
        np.testing.assert_allclose(np.asarray(online[column]), np.asarray(value), rtol=1e-5, atol=1e-6)
