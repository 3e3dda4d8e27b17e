"""Team-draft interleaving and its analysis (Radlinski, Kurup & Joachims, CIKM 2008; Chapelle, Joachims,
Radlinski & Yue, TOIS 2012).

One request, two rankings a (champion) and b (challenger) of the same candidates. A coin flip decides which
team picks first; then the teams alternate, each taking its best item not yet shown, until the slots are
full. A click is credited to the team that contributed the item. A request where both teams got the same
credit (no click at all, or one each) says nothing about which ranker is better: ties are excluded.

Analysis over requests r of users u, with `Draft` holding each request's credits under both coin outcomes:
- `credit_share`: b's credited clicks over all credited clicks of the requests that are not ties;
- `user_share`: the share of users (not tied over all their requests) whose requests gave b more credit;
- `sign_p`: the two-sided sign test of those users' wins against 50%;
- intervals: percentile bootstrap that resamples users (the unit whose requests are correlated) and redraws
  every request's coin flip in each replicate, re-drafting from the logged rankings.
Where only the shown items' clicks are known (a live log), a re-draft that shows an item the logged draft did
not show counts it as not clicked; a replay knows every candidate's outcome and re-drafts exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from llmfeat.models.evaluation.metrics import Interval

A, B = 0, 1  # team ids: a = champion, b = challenger


def team_draft(a: Sequence[str], b: Sequence[str], slots: int, a_first: bool) -> tuple[list[str], list[int]]:
    """(shown items, team of each slot) for one request."""
    shown: list[str] = []
    teams: list[int] = []
    taken: set[str] = set()
    rankings, next_pick = (a, b), [0, 0]
    turn = A if a_first else B
    n = min(slots, len(set(a) | set(b)))
    while len(shown) < n:
        ranking, k = rankings[turn], next_pick[turn]
        while k < len(ranking) and ranking[k] in taken:
            k += 1
        next_pick[turn] = k
        if k < len(ranking):
            shown.append(ranking[k])
            teams.append(turn)
            taken.add(ranking[k])
        turn = 1 - turn  # an exhausted team passes its turn
    return shown, teams


def credits(teams: Sequence[int], shown: Sequence[str], clicked: set[str]) -> tuple[int, int]:
    """(clicks credited to a, to b)."""
    won = [t for t, item in zip(teams, shown, strict=True) if item in clicked]
    return won.count(A), won.count(B)


@dataclass(frozen=True)
class Draft:
    """Per request: its user (index), the coin it was served with, and the credits (a, b) under each coin."""

    users: np.ndarray  # (R,) int, 0..U-1
    a_first: np.ndarray  # (R,) bool: the served draft
    if_a_first: np.ndarray  # (R, 2) credits (a, b) when a picks first
    if_b_first: np.ndarray  # (R, 2) credits when b picks first

    @classmethod
    def of(
        cls,
        users: Sequence[str],
        rankings_a: Sequence[Sequence[str]],
        rankings_b: Sequence[Sequence[str]],
        clicked: Sequence[set[str]],
        a_first: Sequence[bool],
        slots: int,
    ) -> Draft:
        codes = {u: k for k, u in enumerate(dict.fromkeys(users))}
        both = np.zeros((2, len(users), 2))
        for r, (ra, rb, hits) in enumerate(zip(rankings_a, rankings_b, clicked, strict=True)):
            for c, first in enumerate((True, False)):
                shown, teams = team_draft(ra, rb, slots, first)
                both[c, r] = credits(teams, shown, hits)
        return cls(np.array([codes[u] for u in users]), np.asarray(a_first, bool), both[0], both[1])

    @property
    def n_users(self) -> int:
        return int(self.users.max()) + 1 if len(self.users) else 0

    def served(self) -> np.ndarray:
        """(R, 2) credits of the served draft."""
        return np.where(self.a_first[:, None], self.if_a_first, self.if_b_first)


@dataclass(frozen=True)
class InterleavingResult:
    credit_share: Interval  # b's share of credited clicks, ties excluded
    user_share: Interval  # share of non-tied users b won
    sign_p: float  # sign test over those users
    requests: int
    decided_requests: int  # not ties
    users: int
    decided_users: int
    credits: tuple[int, int]  # (a, b) of the served draft
    n_boot: int

    @property
    def effect(self) -> float:
        return self.credit_share.mean - 0.5

    def users_needed(self) -> float:
        """Users for a 95% interval of the credit share to exclude 50% at this effect."""
        return users_needed(self.users, self.credit_share, self.effect)

    def line(self) -> str:
        cs, us = self.credit_share, self.user_share
        return (
            f"challenger's share of credited clicks {cs.mean:.1%} [{cs.low:.1%}, {cs.high:.1%}] "
            f"({self.decided_requests:,} of {self.requests:,} requests decided); users won "
            f"{us.mean:.1%} [{us.low:.1%}, {us.high:.1%}] of {self.decided_users} decided, "
            f"sign test p = {self.sign_p:.3g} (95% intervals: {self.n_boot} user resamples, coins redrawn)"
        )


def users_needed(users: int, interval: Interval, effect: float) -> float:
    """Users for an interval measured on `users` to shrink to `effect`: its half-width scales as
    1 / sqrt(users). inf when the effect is 0."""
    half = (interval.high - interval.low) / 2
    return users * (half / abs(effect)) ** 2 if effect else float("inf")


def _shares(credit: np.ndarray, users: np.ndarray, n_users: int, weight: np.ndarray) -> tuple[float, float]:
    """(credit share, user share) of one replicate: credit (R, 2); weight (U,) user multiplicities."""
    w = weight[users]
    decided = credit[:, 0] != credit[:, 1]
    total = (w * decided * credit.sum(axis=1)).sum()
    share = (w * decided * credit[:, 1]).sum() / total if total else np.nan
    per_user = np.zeros((n_users, 2))
    np.add.at(per_user, users, credit)
    wins, losses = per_user[:, 1] > per_user[:, 0], per_user[:, 1] < per_user[:, 0]
    played = (weight * (wins | losses)).sum()
    return float(share), float((weight * wins).sum() / played) if played else np.nan


def analyze_draft(draft: Draft, n_boot: int = 1000, seed: int = 0) -> InterleavingResult:
    """The served draft's shares, and intervals over `n_boot` replicates of resampled users and coins."""
    U, R = draft.n_users, len(draft.users)
    served = draft.served()
    point = _shares(served, draft.users, U, np.ones(U))
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, 2))
    for k in range(n_boot):
        weight = np.bincount(rng.integers(0, U, U), minlength=U).astype(float)
        coins = rng.random(R) < 0.5
        draws[k] = _shares(
            np.where(coins[:, None], draft.if_a_first, draft.if_b_first), draft.users, U, weight
        )
    per_user = np.zeros((U, 2))
    np.add.at(per_user, draft.users, served)
    wins, losses = int((per_user[:, 1] > per_user[:, 0]).sum()), int((per_user[:, 1] < per_user[:, 0]).sum())
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else float("nan")

    def interval(j: int) -> Interval:
        values = draws[:, j][np.isfinite(draws[:, j])]
        low, high = np.quantile(values, [0.025, 0.975]) if len(values) else (np.nan, np.nan)
        return Interval(point[j], float(low), float(high))

    return InterleavingResult(
        credit_share=interval(0),
        user_share=interval(1),
        sign_p=sign_p,
        requests=R,
        decided_requests=int((served[:, 0] != served[:, 1]).sum()),
        users=U,
        decided_users=wins + losses,
        credits=(int(served[:, 0].sum()), int(served[:, 1].sum())),
        n_boot=n_boot,
    )
