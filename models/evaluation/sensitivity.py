"""How many users an online comparison needs: the A/B split against team-draft interleaving, both simulated
exactly from one replay (every candidate's logged rating is known, and what was shown never changes what
is pushed, so each design of each pair of rankers is the same traffic shown another way).

- A/B: users are split by the service's hash; a user sees one ranker's top `slots`; the lift of CTR with an
  interval that resamples users within each arm (`lift_interval`). Its effect, for the users-needed figure,
  is the lift with every user seeing both rankers (the replay knows it; a live A/B never does).
- Interleaving: every request is a team draft of both rankings (models/evaluation/interleaving.py).
- Users needed for 95%: the interval's half-width scales as 1 / sqrt(users), so the users for it to shrink
  to the effect are users * (half-width / |effect|)^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmfeat.models.evaluation.ab_stats import Arm, lift_interval, unit_hash
from llmfeat.models.evaluation.interleaving import Draft, InterleavingResult, analyze_draft, users_needed
from llmfeat.models.evaluation.metrics import Interval


@dataclass(frozen=True)
class Replayed:
    """One request of a replay: its user, every ranker's ranking, the logged labels, the served coin."""

    user: str
    rankings: dict[str, list[str]]
    labels: dict[str, int]
    a_first: bool | None = None  # the service's draft of champion vs challenger, when it interleaved


@dataclass(frozen=True)
class AbSplit:
    lift: Interval  # CTR lift b / a - 1 of the split
    full_lift: float  # every user seeing both
    users: int

    def users_needed(self) -> float:
        return users_needed(self.users, self.lift, self.full_lift)


def needed(users: float, same: bool) -> float:
    """inf for a comparison of a ranker with itself: there is no effect to detect."""
    return float("inf") if same else users


@dataclass(frozen=True)
class DesignComparison:
    name: str  # e.g. "challenger vs champion"
    a: str
    b: str
    ab: AbSplit
    interleaving: InterleavingResult

    @property
    def ab_users_needed(self) -> float:
        return needed(self.ab.users_needed(), self.a == self.b)

    @property
    def il_users_needed(self) -> float:
        return needed(self.interleaving.users_needed(), self.a == self.b)

    @property
    def ratio(self) -> float:
        """A/B users needed over interleaving users needed."""
        if self.a == self.b:
            return float("nan")
        return self.ab_users_needed / self.il_users_needed

    def row(self) -> dict[str, float | str | int]:
        il, ab = self.interleaving, self.ab
        return {
            "comparison": self.name,
            "a": self.a,
            "b": self.b,
            "users": il.users,
            "requests": il.requests,
            "ab_lift": ab.lift.mean,
            "ab_low": ab.lift.low,
            "ab_high": ab.lift.high,
            "ab_full_lift": ab.full_lift,
            "ab_users_needed": self.ab_users_needed,
            "il_share": il.credit_share.mean,
            "il_low": il.credit_share.low,
            "il_high": il.credit_share.high,
            "il_user_share": il.user_share.mean,
            "il_sign_p": il.sign_p,
            "il_users_needed": self.il_users_needed,
            "ratio": self.ratio,
        }


def top_clicks(ranking: Sequence[str], labels: dict[str, int], slots: int) -> tuple[int, int]:
    """(impressions, clicks) of showing a ranking's top `slots`."""
    top = ranking[:slots]
    return len(top), sum(labels.get(i, 0) for i in top)


def ab_split(
    requests: Sequence[Replayed], a: str, b: str, in_b: dict[str, bool], slots: int, n_boot: int, seed: int
) -> AbSplit:
    """The A/B of rankers a and b with each user in the arm `in_b` says."""
    users = sorted({r.user for r in requests})
    per = {u: np.zeros(4) for u in users}  # impressions and clicks shown a, then shown b
    for r in requests:
        per[r.user] += [
            *top_clicks(r.rankings[a], r.labels, slots),
            *top_clicks(r.rankings[b], r.labels, slots),
        ]

    def arm(members: list[str], col: int) -> Arm:
        rows = np.array([per[u][col : col + 2] for u in members]).reshape(-1, 2)
        return Arm(rows[:, 0], rows[:, 1], rows[:, 1])

    arm_a, arm_b = arm([u for u in users if not in_b[u]], 0), arm([u for u in users if in_b[u]], 2)
    total = np.sum(list(per.values()), axis=0)
    full = (total[3] / total[2]) / (total[1] / total[0]) - 1 if total[1] else float("nan")
    return AbSplit(lift_interval(arm_a, arm_b, "clicks", n_boot, seed), float(full), len(users))


def compare(
    requests: Sequence[Replayed],
    name: str,
    a: str,
    b: str,
    in_b: dict[str, bool],
    slots: int,
    n_boot: int = 1000,
    seed: int = 0,
    served: bool = False,
) -> DesignComparison:
    """Both designs for rankers a and b on the replayed requests. `served`: the interleaving point estimate
    uses the coins the service drew (the live pair); else a coin per request from a stable hash."""
    coins = [
        bool(r.a_first) if served and r.a_first is not None else unit_hash(f"{seed}:{name}:{k}") < 0.5
        for k, r in enumerate(requests)
    ]
    draft = Draft.of(
        [r.user for r in requests],
        [r.rankings[a] for r in requests],
        [r.rankings[b] for r in requests],
        [{i for i, y in r.labels.items() if y == 1} for r in requests],
        coins,
        slots,
    )
    return DesignComparison(
        name, a, b, ab_split(requests, a, b, in_b, slots, n_boot, seed), analyze_draft(draft, n_boot, seed)
    )


def table(rows: Sequence[DesignComparison]) -> str:
    """The sensitivity table as Markdown."""

    def users(n: float) -> str:
        return "-" if not np.isfinite(n) else f"{n:,.0f}"

    lines = [
        "| comparison | users | A/B CTR lift [95%] | lift, all users both | A/B users needed | "
        "interleaving share [95%] | users won | interleaving users needed | ratio |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for d in rows:
        ab, il = d.ab, d.interleaving
        ratio = f"{d.ratio:,.1f}x" if np.isfinite(d.ratio) else "-"
        lines.append(
            f"| {d.name} | {il.users} | {ab.lift.mean:+.1%} [{ab.lift.low:+.1%}, {ab.lift.high:+.1%}] | "
            f"{ab.full_lift:+.1%} | {users(d.ab_users_needed)} | {il.credit_share.mean:.1%} "
            f"[{il.credit_share.low:.1%}, {il.credit_share.high:.1%}] | {il.user_share.mean:.0%} | "
            f"{users(d.il_users_needed)} | {ratio} |"
        )
    return "\n".join(lines)
