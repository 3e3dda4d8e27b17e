"""CTR rankers over ids, side features and (optionally) LLM user and item vectors: DNN and DeepFM.

Notation: B batch, U users, I items (index 0 = an id unseen in training), G genres, F dense side features,
Du / Di LLM vector widths (0 = the model without LLM features), E field-embedding width, K fields.

Fields (each one E-wide embedding per row): user id, item id, genres (multi-hot -> sum of genre embeddings),
dense side features (projected), and with LLM features the projected user and item vectors.

- `FieldArch`      ids, genres, dense        -> (B, K0, E)
- `LlmArch`        user / item LLM vectors   -> (B, 2, E)   (absent when Du = Di = 0)
- `FirstOrderArch` biases + linear terms     -> (B,)
- `FmArch`         pairwise <e_a, e_b> sum   -> (B,)        (DeepFM only)
- `DeepArch`       MLP over all fields       -> (B,)
logit = first order + deep [+ fm]. The model is not the trainer (spark_jobs/train_ctr.py trains it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn


class CtrInputs(NamedTuple):
    user: Tensor  # (B,) int64, 0 = unknown
    item: Tensor  # (B,) int64, 0 = unknown
    genres: Tensor  # (B, G) float32 multi-hot
    dense: Tensor  # (B, F) float32
    user_vec: Tensor  # (B, Du) float32, (B, 0) without LLM features
    item_vec: Tensor  # (B, Di) float32


@dataclass(frozen=True)
class CtrConfig:
    n_users: int  # U including index 0
    n_items: int  # I including index 0
    n_genres: int  # G
    n_dense: int  # F
    user_vec_dim: int = 0  # Du; 0 = no LLM user vector
    item_vec_dim: int = 0  # Di
    kind: Literal["dnn", "deepfm"] = "deepfm"
    emb_dim: int = 16  # E
    hidden: tuple[int, ...] = field(default=(128, 64))
    dropout: float = 0.2

    @property
    def uses_llm(self) -> bool:
        return bool(self.user_vec_dim or self.item_vec_dim)


class FieldArch(nn.Module):
    """Ids, genres and dense features -> 4 field embeddings (B, 4, E)."""

    n_fields = 4

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        self.user_emb = nn.Embedding(cfg.n_users, cfg.emb_dim)
        self.item_emb = nn.Embedding(cfg.n_items, cfg.emb_dim)
        self.genre_emb = nn.Linear(cfg.n_genres, cfg.emb_dim, bias=False)  # multi-hot sum of embeddings
        self.dense_proj = nn.Linear(cfg.n_dense, cfg.emb_dim)
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=0.01)

    def forward(self, x: CtrInputs) -> Tensor:
        fields = [
            self.user_emb(x.user),  # (B, E)
            self.item_emb(x.item),  # (B, E)
            self.genre_emb(x.genres),  # (B, E)
            self.dense_proj(x.dense),  # (B, E)
        ]
        return torch.stack(fields, dim=1)  # (B, 4, E)


class LlmArch(nn.Module):
    """LLM user and item vectors -> 2 field embeddings (B, 2, E); the vectors arrive standardised."""

    n_fields = 2

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        self.user_proj = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.user_vec_dim, cfg.emb_dim))
        self.item_proj = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.item_vec_dim, cfg.emb_dim))

    def forward(self, x: CtrInputs) -> Tensor:
        return torch.stack([self.user_proj(x.user_vec), self.item_proj(x.item_vec)], dim=1)  # (B, 2, E)


class FirstOrderArch(nn.Module):
    """Global bias + user and item biases + linear terms on genres and dense features -> (B,)."""

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        self.user_bias = nn.Embedding(cfg.n_users, 1)
        self.item_bias = nn.Embedding(cfg.n_items, 1)
        self.side = nn.Linear(cfg.n_genres + cfg.n_dense, 1)  # holds the global bias
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, x: CtrInputs) -> Tensor:
        ids = self.user_bias(x.user).squeeze(-1) + self.item_bias(x.item).squeeze(-1)  # (B,)
        return ids + self.side(torch.cat([x.genres, x.dense], dim=-1)).squeeze(-1)  # (B,)


class FmArch(nn.Module):
    """Factorisation-machine term: sum over field pairs of <e_a, e_b> = 0.5 * ((sum e)^2 - sum e^2)."""

    def forward(self, fields: Tensor) -> Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)  # (B, E)
        sum_of_squares = fields.pow(2).sum(dim=1)  # (B, E)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=-1)  # (B,)


class DeepArch(nn.Module):
    """MLP over the concatenated fields (B, K * E) -> (B,)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, fields: Tensor) -> Tensor:
        return self.mlp(fields.flatten(start_dim=1)).squeeze(-1)  # (B,)


class CtrModel(nn.Module):
    """DNN (first order + deep) or DeepFM (+ FM) over ids, side features and optional LLM vectors."""

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        self.cfg = cfg
        self.fields = FieldArch(cfg)
        self.llm = LlmArch(cfg) if cfg.uses_llm else None
        n_fields = FieldArch.n_fields + (LlmArch.n_fields if self.llm is not None else 0)  # K
        self.first_order = FirstOrderArch(cfg)
        self.fm = FmArch() if cfg.kind == "deepfm" else None
        self.deep = DeepArch(n_fields * cfg.emb_dim, tuple(cfg.hidden), cfg.dropout)

    def forward(self, x: CtrInputs) -> Tensor:
        """-> click logit (B,)."""
        fields = self.fields(x)  # (B, 4, E)
        if self.llm is not None:
            fields = torch.cat([fields, self.llm(x)], dim=1)  # (B, 6, E)
        logit = self.first_order(x) + self.deep(fields)  # (B,)
        if self.fm is not None:
            logit = logit + self.fm(fields)
        return logit
