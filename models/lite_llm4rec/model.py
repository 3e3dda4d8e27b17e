"""Lite-LLM4Rec: item vectors from an LLM (encoded once) -> a small recommendation transformer over a user's
item-vector sequence -> an item projection head that scores every item in one step.

Notation: B batch, S sequence length (left padded, newest last), H LLM width, D model width, I items
(index 0 = padding).

Paper (arXiv 2402.09543): the item LLM turns each item's text into one vector, so an item's text is never
re-tokenised for each history it appears in; a recommendation model runs over the sequence of item vectors;
a straight projection head gives logits over all items (no beam search); trained with cross-entropy.
Choices the paper leaves open are parameters here: the LLM layer (`lite.layer`, from `items_repr`), the
width and depth of the recommendation transformer; the item vectors are frozen and standardised per dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from llmfeat.models.lite_llm4rec.sasrec import CausalSeqEncoder, SASRec, SeqConfig


class ItemVectorTable(nn.Module):
    """Frozen LLM item vectors (I + 1, H), row 0 (padding) zero; standardised per dimension over items."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        v = vectors.float()  # (I, H)
        v = (v - v.mean(0)) / (v.std(0) + 1e-6)
        self.table: torch.Tensor
        self.register_buffer("table", torch.cat([torch.zeros(1, v.shape[1]), v]))  # (I + 1, H)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table[seq]  # (B, S) -> (B, S, H)


class ItemAdapter(nn.Module):
    """LLM space -> recommendation space: (B, S, H) -> (B, S, D)."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ItemProjectionHead(nn.Module):
    """(..., D) -> (..., I + 1) logits over all items in one matrix product."""

    def __init__(self, dim: int, n_items: int):
        super().__init__()
        self.proj = nn.Linear(dim, n_items + 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class LiteLLM4Rec(nn.Module):
    """Item indices (B, S) -> states (B, S, D); `scores` -> (..., I + 1) logits."""

    def __init__(self, item_vectors: torch.Tensor, cfg: SeqConfig):
        super().__init__()
        if item_vectors.shape[0] != cfg.n_items:
            raise ValueError(f"{item_vectors.shape[0]} item vectors for {cfg.n_items} items")
        self.cfg = cfg
        self.items = ItemVectorTable(item_vectors)
        self.adapter = ItemAdapter(item_vectors.shape[1], cfg.dim, cfg.dropout)
        self.encoder = CausalSeqEncoder(cfg)
        self.head = ItemProjectionHead(cfg.dim, cfg.n_items)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        real = seq > 0  # (B, S)
        return self.encoder(self.adapter(self.items(seq)), real)  # (B, S, D)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def next_item_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, S) histories -> (B, I + 1) scores for the item after the newest one."""
        return self.scores(self(seq)[:, -1])


# Either next-item model: both map (B, S) histories to scores over every item.
NextItemModel = SASRec | LiteLLM4Rec
