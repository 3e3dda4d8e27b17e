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


class SelfAttentionBlock(nn.Module):
    """Pre-norm block: x + MHA(LN(x)) under a mask, then x + FFN(LN(x)). (B, S, D) -> (B, S, D)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), allowed (B, 1, S, S) bool: query t may attend to key j."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=p
        )  # (B, h, S, d/h)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class CausalSeqEncoder(nn.Module):
    """(B, S, D) item inputs + positions -> (B, S, D) states; position t sees positions <= t only.

    Padding keys are masked out; each position may always see itself, so a padded row never has an empty
    attention set (no NaN).
    """

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        self.pos = nn.Embedding(cfg.max_seq, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.blocks)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), real (B, S) bool (False = padding) -> (B, S, D)."""
        s = x.shape[1]
        positions = torch.arange(s, device=x.device)
        h = self.drop(x + self.pos(positions)[None]) * real[..., None]  # (B, S, D)
        causal = positions[None, :] <= positions[:, None]  # (S, S): query t, key j <= t
        self_ = torch.eye(s, dtype=torch.bool, device=x.device)
        allowed = (causal[None] & (real[:, None, :] | self_[None]))[:, None]  # (B, 1, S, S)
        for block in self.blocks:
            h = block(h, allowed)
        return self.norm(h)


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
