"""CTR rankers over ids and point-in-time side features, with LLM user and item vectors as a residual branch.

Notation: B batch, U users, I items (index 0 = an id unseen in training), G genres, F dense side features,
Du / Di LLM vector widths (0 = the model without LLM features), E field-embedding width, K fields, H the
residual branch's width.

The id model (the champion on its own):
- `FieldArch`      ids, genres, dense        -> (B, 4, E)
- `FirstOrderArch` biases + linear terms     -> (B,)
- `FmArch`         pairwise <e_a, e_b> sum   -> (B,)        (DeepFM only)
- `DeepArch`       MLP over all fields       -> (B,)
With LLM vectors, `LlmResidual` adds a logit of its own: [u, i, u * i, missing flags, cold-id flags, dense]
-> MLP -> (B,), its last layer zero-initialised, so that the model starts as the id model and the vectors
enter only as far as they help (the trainer fits it on top of a fitted, frozen id part, with ids dropped to
index 0 at the validation period's cold rate, and keeps the zero branch when the vectors do not help on
validation).

logit = first order + deep [+ fm] [+ residual]. The model is not the trainer (models/ctr/train.py).
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
    vec_missing: Tensor  # (B, 2) float32: no user vector, no item vector


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
    residual_width: int = 64  # H

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


class LlmResidual(nn.Module):
    """LLM user and item vectors (standardised, zero where missing) -> a residual logit (B,), 0 at init.

    Besides the vectors it sees what decides how much they can add to the id logit: whether each vector is
    missing, whether each id is cold (index 0: the id part knows nothing of it) and the dense side features
    (counts, click rates, has-history)."""

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        du, di = cfg.user_vec_dim, cfg.item_vec_dim
        self.cross = du == di and du > 0  # u * i: the user-item affinity a dot product would measure
        width = du + di + (du if self.cross else 0) + 2 + 2 + cfg.n_dense
        out = nn.Linear(cfg.residual_width, 1)
        nn.init.zeros_(out.weight)  # the model starts as the id model
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(width, cfg.residual_width),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            out,
        )

    def forward(self, x: CtrInputs) -> Tensor:
        parts = [x.user_vec, x.item_vec]  # (B, Du), (B, Di)
        if self.cross:
            parts.append(x.user_vec * x.item_vec)  # (B, D)
        cold = torch.stack([x.user == 0, x.item == 0], dim=-1).float()  # (B, 2)
        parts += [x.vec_missing, cold, x.dense]  # (B, 2), (B, 2), (B, F)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)


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
    """DNN (first order + deep) or DeepFM (+ FM) over ids and side features, + the LLM residual if any."""

    def __init__(self, cfg: CtrConfig):
        super().__init__()
        self.cfg = cfg
        self.fields = FieldArch(cfg)
        self.first_order = FirstOrderArch(cfg)
        self.fm = FmArch() if cfg.kind == "deepfm" else None
        self.deep = DeepArch(FieldArch.n_fields * cfg.emb_dim, tuple(cfg.hidden), cfg.dropout)
        self.residual = LlmResidual(cfg) if cfg.uses_llm else None

    def id_logit(self, x: CtrInputs) -> Tensor:
        fields = self.fields(x)  # (B, 4, E)
        logit = self.first_order(x) + self.deep(fields)  # (B,)
        return logit + self.fm(fields) if self.fm is not None else logit

    def forward(self, x: CtrInputs) -> Tensor:
        """-> click logit (B,)."""
        logit = self.id_logit(x)
        return logit + self.residual(x) if self.residual is not None else logit

    def id_parameters(self) -> list[nn.Parameter]:
        residual = {id(p) for p in self.residual.parameters()} if self.residual is not None else set()
        return [p for p in self.parameters() if id(p) not in residual]
