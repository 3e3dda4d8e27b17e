"""SASRec-style ID-only sequential recommender, and the causal sequence encoder it shares with Lite-LLM4Rec.

Notation: B batch, S sequence length (left padded, newest item last), D model width, I items (0 = padding).

SASRec (Kang & McAuley 2018), the simplest faithful form: learned item-ID embeddings + positions -> causal
self-attention blocks -> at each position the next item is scored by a dot product with every item embedding
(tied weights); trained with cross-entropy over all items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SeqConfig:
    n_items: int  # I (item indices 1..I)
    max_seq: int = 50
    dim: int = 64
    heads: int = 2
    blocks: int = 2
    dropout: float = 0.2


class CausalSeqEncoder(nn.Module):
    """(B, S, D) item inputs + positions -> (B, S, D) states; position t sees positions <= t only.

    Padding keys are masked out; each position may always see itself, so a padded row never has an empty
    attention set (no NaN).
    """

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        self.heads = cfg.heads
        self.pos = nn.Embedding(cfg.max_seq, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.stack = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), real (B, S) bool (False = padding) -> (B, S, D)."""
        b, s, _ = x.shape
        positions = torch.arange(s, device=x.device)
        h = self.drop(x + self.pos(positions)[None]) * real[..., None]  # (B, S, D)
        causal = positions[None, :] <= positions[:, None]  # (S, S): query t, key j <= t
        allowed = causal[None] & (real[:, None, :] | torch.eye(s, dtype=torch.bool, device=x.device)[None])
        mask = torch.zeros(b, s, s, device=x.device).masked_fill(~allowed, float("-inf"))  # (B, S, S)
        mask = mask.repeat_interleave(self.heads, 0)  # (B * heads, S, S)
        return self.norm(self.stack(h, mask=mask))


class SASRec(nn.Module):
    """Item IDs (B, S) -> states (B, S, D); `scores` turns states into (..., I + 1) logits over all items."""

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=cfg.dim**-0.5)
        self.encoder = CausalSeqEncoder(cfg)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        real = seq > 0  # (B, S)
        return self.encoder(self.item_emb(seq) * self.cfg.dim**0.5, real)  # (B, S, D)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight.T  # (..., D) -> (..., I + 1)

    def next_item_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, S) histories -> (B, I + 1) scores for the item after the newest one."""
        return self.scores(self(seq)[:, -1])
