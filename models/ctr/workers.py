"""Training one model on several worker processes with torch.distributed (started by pyspark's
TorchDistributor in spark_jobs/train_ctr.py, or by torchrun): each worker streams its own share of the
training set's files (StreamSource.shard) and they step together.

Every worker starts from the same seed, so from the same weights; before each optimiser step the gradients
are averaged over the workers (one all-reduce of all of them), so every worker takes the same step and holds
the same model throughout, as DistributedDataParallel would, without wrapping the model (the trainer calls
parts of it, `id_logit` and the branch, that a DDP wrapper's forward would not see). Workers step in
lockstep: an epoch ends for all when the first runs out of rows (as DistributedSampler's drop_last; the next
epoch's file order gives the shares other rows). Early-stopping scores are rank 0's, so that every worker
keeps the same epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmfeat.models.ctr.stream import Encoded


@dataclass(frozen=True)
class Workers:
    """This process's place among the workers of one training; torch.distributed is initialised."""

    rank: int
    world: int

    @classmethod
    def join(cls, backend: str = "gloo") -> Workers:
        """Join the group the launcher described (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def lockstep(self, batches: Iterable[Encoded]) -> Iterator[Encoded]:
        """This worker's batches while every worker still has one. Batches of fewer than 2 rows (the trainer
        skips them) are skipped here, so that every worker runs the same number of backward passes."""
        mine = iter(batches)
        while True:
            batch = next(mine, None)
            while batch is not None and len(batch[1]) < 2:
                batch = next(mine, None)
            have = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if batch is None or not have.item():
                return
            yield batch

    def average_gradients(self, params: list[nn.Parameter]) -> Callable[[], None]:
        """A call that replaces each gradient of `params` by its mean over the workers (one all-reduce)."""

        def average() -> None:
            with_grad = [p for p in params if p.grad is not None]  # the same on every worker: same code path
            if not with_grad:
                return
            flat = torch.cat([p.grad.reshape(-1) for p in with_grad if p.grad is not None])
            dist.all_reduce(flat)
            flat /= self.world
            start = 0
            for p in with_grad:
                p.grad = flat[start : start + p.numel()].view_as(p).clone()
                start += p.numel()

        return average

    def agree(self, score_fn: Callable[[], float]) -> Callable[[], float]:
        """`score_fn` as rank 0 computes it, on every worker."""

        def score() -> float:
            value = torch.tensor([score_fn()], dtype=torch.float64)
            dist.broadcast(value, src=0)
            return float(value.item())

        return score
