"""The fixed downstream CTR model that judges every representation: an ID side plus user and item vectors.

Notation: B batch, U users, I items, E id-embedding width, F dense ID-side features, Du / Di vector widths,
P tower width.

- `IdModel`: the ordinary ID ranker: global bias + user and item biases + <user emb, item emb> + a linear
  term on the train-period popularity features. Learned on the train split only.
- `CtrProbe`: the ID model's logit plus a correction from the LLM vectors: user and item towers (D -> P), an
  interaction MLP over [dense, id logit, v_u, v_i, v_u * v_i]. With no vectors (Du = Di = 0) it is the ID-only
  reference, so every method is judged by what its vectors add to the same ID model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class IdModelConfig:
    n_users: int
    n_items: int
    n_dense: int
    emb_dim: int = 16  # E


class IdModel(nn.Module):
    def __init__(self, cfg: IdModelConfig):
        super().__init__()
        self.user_emb = nn.Embedding(cfg.n_users, cfg.emb_dim)
        self.item_emb = nn.Embedding(cfg.n_items, cfg.emb_dim)
        self.user_bias = nn.Embedding(cfg.n_users, 1)
        self.item_bias = nn.Embedding(cfg.n_items, 1)
        self.dense = nn.Linear(cfg.n_dense, 1)  # includes the global bias
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=0.01)
        for bias in (self.user_bias, self.item_bias):
            nn.init.zeros_(bias.weight)

    def forward(self, user: Tensor, item: Tensor, dense: Tensor) -> Tensor:
        """user, item (B,) int64; dense (B, F) -> logit (B,)."""
        dot = (self.user_emb(user) * self.item_emb(item)).sum(-1)  # (B,)
        biases = self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1)  # (B,)
        return dot + biases + self.dense(dense).squeeze(-1)


@dataclass(frozen=True)
class ProbeConfig:
    user_dim: int  # Du, 0 = no user vector
    item_dim: int  # Di, 0 = no item vector
    n_dense: int  # F
    tower_dim: int = 32  # P
    hidden_dim: int = 64
    dropout: float = 0.2


class VectorTower(nn.Module):
    """(B, D) -> (B, P); a zero-width input gives a zero-width output."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.out_dim = out_dim if in_dim else 0
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim)) if in_dim else nn.Identity()

    def forward(self, v: Tensor) -> Tensor:
        return self.net(v)


class CtrProbe(nn.Module):
    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.user_tower = VectorTower(cfg.user_dim, cfg.tower_dim, cfg.dropout)
        self.item_tower = VectorTower(cfg.item_dim, cfg.tower_dim, cfg.dropout)
        both = self.user_tower.out_dim and self.item_tower.out_dim
        width = (
            cfg.n_dense
            + 1
            + self.user_tower.out_dim
            + self.item_tower.out_dim
            + (cfg.tower_dim if both else 0)
        )
        self.use_product = bool(both)
        self.over = nn.Sequential(
            nn.Linear(width, cfg.hidden_dim), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, 1)
        )
        last = self.over[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # starts as the ID model
        nn.init.zeros_(last.bias)

    def forward(self, id_logit: Tensor, dense: Tensor, v_user: Tensor, v_item: Tensor) -> Tensor:
        """id_logit (B,), dense (B, F), v_user (B, Du), v_item (B, Di) -> logit (B,)."""
        h_u = self.user_tower(v_user)  # (B, P) or (B, 0)
        h_i = self.item_tower(v_item)  # (B, P) or (B, 0)
        parts = [dense, id_logit.unsqueeze(-1), h_u, h_i]
        if self.use_product:
            parts.append(h_u * h_i)
        return id_logit + self.over(torch.cat(parts, dim=-1)).squeeze(-1)
