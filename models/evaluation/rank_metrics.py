"""Full-ranking next-item metrics: Recall@K and NDCG@K over all items, the history's items excluded.

Notation: Q queries, I items (index 0 is padding and never ranked), K cut-off.

The target's rank is the number of eligible items that score strictly higher than it (ties favour the
target's neighbours equally: half of the tied items count). Per query: recall@K = [rank < K],
NDCG@K = [rank < K] / log2(rank + 2) (one relevant item, so the ideal DCG is 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmfeat.models.evaluation.metrics import Interval, bootstrap_interval, seed_interval

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # histories (B, S) -> scores (B, I + 1)


def target_ranks(scores: torch.Tensor, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (B, I + 1), history (B, S), target (B,) -> ranks (B,) float (0 = best)."""
    s = scores.float().clone()
    s[:, 0] = float("-inf")  # padding
    t = s.gather(1, target[:, None])  # (B, 1)
    seen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, history, True)  # (B, I + 1)
    seen[:, 0] = True
    seen.scatter_(1, target[:, None], False)  # the target itself stays eligible
    s = s.masked_fill(seen, float("-inf"))
    higher = (s > t).sum(1).float()
    ties = (s == t).sum(1).float() - 1  # the target ties with itself
    return higher + ties / 2


@torch.no_grad()
def rank_queries(
    score_fn: ScoreFn, history: np.ndarray, target: np.ndarray, batch: int = 512, device: str = "cpu"
) -> np.ndarray:
    """(Q,) ranks of each query's target under `score_fn`, in batches, on `device`."""
    out = []
    for s in range(0, len(target), batch):
        h = torch.from_numpy(history[s : s + batch]).to(device)
        t = torch.from_numpy(target[s : s + batch]).to(device)
        out.append(target_ranks(score_fn(h), h, t).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@dataclass(frozen=True)
class RankReport:
    """Means over seeds, with a bootstrap interval over queries (seed-averaged) and one over seeds."""

    recall: Interval
    ndcg: Interval
    recall_seeds: Interval
    ndcg_seeds: Interval
    n: int


def rank_report(ranks: np.ndarray, k: int, n_boot: int = 500) -> RankReport:
    """ranks (S, Q) from S seeds (S may be 1: a deterministic model) -> RankReport."""
    n = ranks.shape[1]
    if n == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return RankReport(nan, nan, nan, nan, 0)
    rec, nd = recall_at(ranks, k), ndcg_at(ranks, k)  # (S, Q)
    rec_q, nd_q = rec.mean(0), nd.mean(0)  # (Q,) seed-averaged per query
    return RankReport(
        bootstrap_interval(lambda idx: float(rec_q[idx].mean()), n, n_boot),
        bootstrap_interval(lambda idx: float(nd_q[idx].mean()), n, n_boot),
        seed_interval(rec.mean(1)),
        seed_interval(nd.mean(1)),
        n,
    )


def popularity_scorer(train_counts: np.ndarray) -> ScoreFn:
    """Train-period popularity: the same (I + 1,) scores for every history."""
    pop = torch.from_numpy(train_counts.astype(np.float32))

    def score(history: torch.Tensor) -> torch.Tensor:
        return pop.to(history.device).expand(history.shape[0], -1)

    return score
