"""Full-ranking next-item metrics: Recall@K and NDCG@K over all items, the user's whole history excluded.

Notation: Q queries, I items (index 0 is padding and never ranked), K cut-off, S the model's input window.

Eligible items: every item except padding and the items of the user's WHOLE history before the query
(`ItemSets`, one set per query), not only the newest S items the model reads; the target itself stays
eligible. The target's rank is the number of eligible items that score strictly higher than it (ties favour
the target's neighbours equally: half of the tied items count). Per query: recall@K = [rank < K],
NDCG@K = [rank < K] / log2(rank + 2) (one relevant item, so the ideal DCG is 1).

Intervals resample users, not queries (a cluster bootstrap: a user's queries move together), as the
evaluation protocol asks; a t interval over seeds is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmfeat.models.evaluation.metrics import Interval, seed_interval

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # histories (B, S) -> scores (B, I + 1)


@dataclass(frozen=True)
class ItemSets:
    """One set of item indices per row (a user's whole history), stored flat: row r holds
    items[offsets[r] : offsets[r + 1]]. offsets (R + 1,) int64, items (nnz,) int64."""

    offsets: np.ndarray
    items: np.ndarray

    @classmethod
    def from_lists(cls, rows: list[np.ndarray]) -> ItemSets:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        items = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return cls(offsets, items)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.items[self.offsets[r] : self.offsets[r + 1]]

    def take(self, idx: np.ndarray) -> ItemSets:
        return ItemSets.from_lists([self.row(int(r)) for r in idx])

    def mask(self, start: int, stop: int, width: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows start..stop-1 as a (stop - start, width) bool mask, True at each row's items."""
        a, b = self.offsets[start], self.offsets[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(self.offsets[start : stop + 1]))  # (nnz',)
        out = torch.zeros(stop - start, width, dtype=torch.bool, device=device)
        out[torch.from_numpy(rows).to(device), torch.from_numpy(self.items[a:b]).to(device)] = True
        return out


def target_ranks(scores: torch.Tensor, seen: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (B, I + 1), seen (B, I + 1) bool mask of excluded items (or (B, S) item indices),
    target (B,) -> ranks (B,) float (0 = best)."""
    s = scores.float().clone()
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, seen, True)  # (B, I + 1)
    seen = seen.clone()
    seen[:, 0] = True  # padding
    seen.scatter_(1, target[:, None], False)  # the target itself stays eligible
    t = s.gather(1, target[:, None])  # (B, 1)
    s = s.masked_fill(seen, float("-inf"))
    higher = (s > t).sum(1).float()
    ties = (s == t).sum(1).float() - 1  # the target ties with itself
    return higher + ties / 2


@torch.no_grad()
def rank_queries(
    score_fn: ScoreFn,
    history: np.ndarray,
    target: np.ndarray,
    seen: ItemSets,
    batch: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """(Q,) ranks of each query's target under `score_fn` (fed the input window `history` (Q, S)), with
    each query's whole history `seen` excluded, in batches, on `device`."""
    out = []
    for s in range(0, len(target), batch):
        e = min(s + batch, len(target))
        h = torch.from_numpy(history[s:e]).to(device)
        t = torch.from_numpy(target[s:e]).to(device)
        scores = score_fn(h)  # (B, I + 1)
        out.append(target_ranks(scores, seen.mask(s, e, scores.shape[1], device), t).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def user_bootstrap_interval(
    values: np.ndarray, users: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of per-query `values` (Q,) with a percentile interval from resampling USERS with replacement
    (each drawn user brings all its queries): the interval the protocol asks for when queries cluster by
    user."""
    nan = float("nan")
    if len(values) == 0:
        return Interval(nan, nan, nan)
    _, group = np.unique(users, return_inverse=True)
    sums = np.bincount(group, weights=values)  # (U,)
    counts = np.bincount(group).astype(np.float64)  # (U,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), (n_boot, len(sums)))  # (n_boot, U)
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - level) / 2
    return Interval(
        float(values.mean()), float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
    )


@dataclass(frozen=True)
class RankReport:
    """Means over seeds, with a user-clustered bootstrap interval (seed-averaged per query) and a t interval
    over seeds."""

    recall: Interval
    ndcg: Interval
    recall_seeds: Interval
    ndcg_seeds: Interval
    n: int
    users: int = 0


def rank_report(ranks: np.ndarray, k: int, users: np.ndarray, n_boot: int = 1000) -> RankReport:
    """ranks (S, Q) from S seeds (S may be 1: a deterministic model), users (Q,) each query's user ->
    RankReport."""
    n = ranks.shape[1]
    if n == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return RankReport(nan, nan, nan, nan, 0, 0)
    rec, nd = recall_at(ranks, k), ndcg_at(ranks, k)  # (S, Q)
    return RankReport(
        user_bootstrap_interval(rec.mean(0), users, n_boot),  # seed-averaged per query
        user_bootstrap_interval(nd.mean(0), users, n_boot),
        seed_interval(rec.mean(1)),
        seed_interval(nd.mean(1)),
        n,
        len(np.unique(users)),
    )


def paired_difference(
    ranks_a: np.ndarray, ranks_b: np.ndarray, k: int, users: np.ndarray, n_boot: int = 1000
) -> tuple[Interval, Interval]:
    """Recall@K and NDCG@K of model a minus model b on the same queries (ranks (S, Q) each, seed-averaged per
    query), with intervals that resample users: the paired comparison the protocol asks for."""
    rec = recall_at(ranks_a, k).mean(0) - recall_at(ranks_b, k).mean(0)  # (Q,)
    nd = ndcg_at(ranks_a, k).mean(0) - ndcg_at(ranks_b, k).mean(0)  # (Q,)
    return user_bootstrap_interval(rec, users, n_boot), user_bootstrap_interval(nd, users, n_boot)


def popularity_scorer(train_counts: np.ndarray) -> ScoreFn:
    """Train-period popularity: the same (I + 1,) scores for every history."""
    pop = torch.from_numpy(train_counts.astype(np.float32))

    def score(history: torch.Tensor) -> torch.Tensor:
        return pop.to(history.device).expand(history.shape[0], -1)

    return score
