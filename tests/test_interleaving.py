"""Team-draft interleaving, its analysis, and the A/B-vs-interleaving sensitivity on synthetic traffic where
the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from llmfeat.models.evaluation.interleaving import A, B, Draft, analyze_draft, credits, team_draft
from llmfeat.models.evaluation.sensitivity import Replayed, compare, table


def test_the_coin_picks_first_then_the_teams_alternate_each_taking_its_best_unshown_item() -> None:
    a, b = ["1", "2", "3", "4"], ["2", "1", "5", "3"]
    assert team_draft(a, b, 3, a_first=True) == (["1", "2", "3"], [A, B, A])
    assert team_draft(a, b, 3, a_first=False) == (["2", "1", "5"], [B, A, B])
    assert team_draft(a, a, 4, a_first=True) == (a, [A, B, A, B])  # identical rankings: the coin splits them


def test_an_exhausted_team_passes_and_the_slots_never_repeat_an_item() -> None:
    shown, teams = team_draft(["1"], ["1", "2", "3"], 3, a_first=True)
    assert shown == ["1", "2", "3"] and teams == [A, B, B]
    assert team_draft(["1", "2"], ["2", "1"], 5, a_first=False)[0] == ["2", "1"]  # fewer items than slots


def test_a_click_is_credited_to_the_team_that_contributed_the_item() -> None:
    shown, teams = team_draft(["1", "2", "3"], ["2", "4", "3"], 3, a_first=True)  # 1 (a), 2 (b), 3 (a)
    assert credits(teams, shown, {"2", "3", "9"}) == (1, 1)


def synthetic(n_users: int, better: float, seed: int = 0) -> tuple[list[str], list, list, list]:
    """Requests of 10 candidates, 2 per user; ranker b sorts by a noisy label signal of strength `better`,
    ranker a by pure noise (better=0: both noise)."""
    rng = np.random.default_rng(seed)
    users, ra, rb, clicked = [], [], [], []
    for u in range(n_users):
        for _ in range(2):
            items = [f"{u}-{k}-{rng.integers(1_000_000)}" for k in range(10)]
            y = rng.random(10) < 0.4
            users.append(str(u))
            ra.append([items[j] for j in np.argsort(rng.normal(size=10))])
            rb.append([items[j] for j in np.argsort(-(better * y + rng.normal(size=10)))])
            clicked.append({i for i, c in zip(items, y, strict=True) if c})
    return users, ra, rb, clicked


def test_identical_rankers_hold_half_and_a_better_ranker_wins_beyond_it() -> None:
    users, ra, _, clicked = synthetic(300, 0.0)
    coins = [k % 2 == 0 for k in range(len(users))]
    same = analyze_draft(Draft.of(users, ra, ra, clicked, coins, 3), n_boot=300)
    assert same.credit_share.low < 0.5 < same.credit_share.high
    users, ra, rb, clicked = synthetic(300, 2.0)
    better = analyze_draft(Draft.of(users, ra, rb, clicked, coins, 3), n_boot=300)
    assert better.credit_share.low > 0.5 and better.user_share.mean > 0.5 and better.sign_p < 0.01
    worse = analyze_draft(Draft.of(users, rb, ra, clicked, coins, 3), n_boot=300)
    assert worse.credit_share.high < 0.5
    assert better.users_needed() < better.users  # detected: fewer users than it had would do


def test_redrawn_coins_widen_the_interval_only_by_the_draft_noise() -> None:
    """Re-drafting with the other coin changes credits only where the two drafts differ."""
    users, ra, rb, clicked = synthetic(50, 1.0)
    draft = Draft.of(users, ra, rb, clicked, [True] * len(users), 3)
    assert np.array_equal(draft.served(), draft.if_a_first)
    differ = np.any(draft.if_a_first != draft.if_b_first, axis=1)
    assert 0 < differ.mean() < 1


def test_the_sensitivity_table_simulates_both_designs_from_one_set_of_rankings() -> None:
    users, ra, rb, clicked = synthetic(200, 2.0, seed=3)
    requests = [
        Replayed(u, {"champion": a, "challenger": b}, {i: int(i in c) for i in a}, k % 2 == 0)
        for k, (u, a, b, c) in enumerate(zip(users, ra, rb, clicked, strict=True))
    ]
    in_b = {u: int(u) % 2 == 1 for u in set(users)}
    pair = compare(requests, "challenger vs champion", "champion", "challenger", in_b, 3, 200, 0, served=True)
    aa = compare(requests, "A/A", "champion", "champion", in_b, 3, 200, 0)
    assert pair.ab.full_lift > 0.1 and pair.interleaving.credit_share.low > 0.5
    assert pair.ab.users == 200 and pair.ab.users_needed() > pair.interleaving.users_needed()
    assert aa.ab.full_lift == 0 and not np.isfinite(aa.il_users_needed) and np.isnan(aa.ratio)
    assert aa.interleaving.credit_share.low < 0.5 < aa.interleaving.credit_share.high
    rendered = table([aa, pair])
    assert rendered.count("\n") == 3 and "| A/A | 200 |" in rendered


@pytest.mark.parametrize("slots", [1, 3])
def test_the_served_draft_is_what_the_service_shows(slots: int) -> None:
    a, b = ["3", "1", "2"], ["1", "2", "3"]
    for first in (True, False):
        shown, _ = team_draft(a, b, slots, first)
        assert len(shown) == slots and len(set(shown)) == slots
