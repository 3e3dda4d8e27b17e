"""MARC: modular representation compression of middle-layer LLM states (docs/methods.md, arXiv 2604.18146).

Notation: B batch, D input dimension (the tapped layer's width, 576 for SmolLM2-135M), d compressed dimension,
H hidden width, T task-adaptation width.

Three parts, each a separate module so that only the first one ships:
- `MarcCompressor` (the artefact: registry, Spark): per-dimension standardisation of the tapped layer (the
  middle layers of SmolLM2 have activations about 100x the final layer's), then an MLP D -> H -> d.
- `TaskAdaptation` (training only, a different structure): per-entity adapters d -> T and a matching network
  over [t_u, t_i, t_u * t_i] that predicts the click. It absorbs what is specific to this task so that the
  compressor keeps a general representation ("Modular Task Decoupling").
- The information constraints, HSIC with RBF kernels: dependence between the representation before (x) and
  after (z) compression is maximised; dependence between the compressor output (z) and the task module's
  output (t) is minimised.

Not public, so chosen here as the simplest faithful option and exposed as parameters: the HSIC is the
normalised form (centred-kernel alignment, in [0, 1]) so that the two loss weights are on the scale of the
BCE; the kernel width is the median pairwise distance times `kernel_scale`; the compressor is an MLP with one
hidden layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ENTITIES = ("users", "items")  # table prefixes: users_repr, items_repr


def _part(entity: str) -> str:
    """Module key for an entity ("users" -> "user"): nn.ModuleDict keys must not shadow its methods."""
    return entity.removesuffix("s")


@dataclass(frozen=True)
class MarcConfig:
    in_dim: int = 576  # D
    out_dim: int = 64  # d
    hidden_dim: int = 256  # H
    task_dim: int = 64  # T
    dropout: float = 0.1
    keep_weight: float = 0.1  # weight of -nHSIC(x, z): keep the input's information
    indep_weight: float = 0.0  # weight of +nHSIC(z, t); off by default: no measured gain (docs/marc.md)
    kernel_scale: float = 1.0  # RBF width = kernel_scale * median pairwise distance


class MarcCompressor(nn.Module):
    """Tapped-layer state (B, D) -> compressed vector (B, d). The only part that ships."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.zeros(in_dim))  # (D,)
        self.register_buffer("std", torch.ones(in_dim))  # (D,)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    @torch.no_grad()
    def fit_standardiser(self, x: Tensor) -> None:
        """Per-dimension mean and std from the training entities' states x (N, D)."""
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0).clamp_min(1e-6))

    def standardise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.standardise(x.float()))  # (B, D) -> (B, d)


class TaskAdaptation(nn.Module):
    """Training-only matching network: (z_u, z_i) each (B, d) -> click logit (B,) and task outputs (B, T)
    each.

    Its structure differs from the compressor's on purpose: per-entity linear adapters with a layer norm, then
    an interaction MLP over the concatenation and the element-wise product.
    """

    def __init__(self, in_dim: int, task_dim: int, dropout: float = 0.1):
        super().__init__()
        self.adapt = nn.ModuleDict(
            {_part(e): nn.Sequential(nn.Linear(in_dim, task_dim), nn.LayerNorm(task_dim)) for e in ENTITIES}
        )
        self.match = nn.Sequential(
            nn.Linear(3 * task_dim, task_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(task_dim, 1),
        )

    def forward(self, z_u: Tensor, z_i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t_u = self.adapt["user"](z_u)  # (B, T)
        t_i = self.adapt["item"](z_i)  # (B, T)
        logit = self.match(torch.cat([t_u, t_i, t_u * t_i], dim=-1)).squeeze(-1)  # (B,)
        return logit, t_u, t_i


def rbf_kernel(x: Tensor, scale: float = 1.0) -> Tensor:
    """RBF Gram matrix (B, B) of x (B, F); width = scale * median pairwise distance (detached)."""
    dist2 = torch.cdist(x, x).pow(2)  # (B, B)
    with torch.no_grad():
        off = dist2[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
        sigma2 = (scale**2) * off.median().clamp_min(1e-8)
    return torch.exp(-dist2 / (2 * sigma2))


def centre(k: Tensor) -> Tensor:
    """H K H for the centring matrix H = I - 11^T / B, in O(B^2): (B, B) -> (B, B)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k: Tensor, l_: Tensor) -> Tensor:
    """Biased empirical HSIC of two Gram matrices (B, B): tr(K H L H) / (B - 1)^2 = <HKH, HLH> / (B - 1)^2."""
    n = k.shape[0]
    return (centre(k) * centre(l_)).sum() / (n - 1) ** 2


def normalised_hsic(x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
    """HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y)) with RBF kernels; x (B, F), y (B, G) -> scalar in [0, 1]."""
    k = rbf_kernel(x, scale)
    l_ = rbf_kernel(y, scale)
    return hsic(k, l_) / (hsic(k, k) * hsic(l_, l_)).sqrt().clamp_min(1e-12)


@dataclass
class MarcLoss:
    total: Tensor
    bce: Tensor
    keep: Tensor  # nHSIC(x, z), maximised
    indep: Tensor  # nHSIC(z, t), minimised


class Marc(nn.Module):
    """Both compressors, the task-adaptation module and the constrained loss."""

    def __init__(self, cfg: MarcConfig):
        super().__init__()
        self.cfg = cfg
        self.compressors = nn.ModuleDict(
            {_part(e): MarcCompressor(cfg.in_dim, cfg.out_dim, cfg.hidden_dim, cfg.dropout) for e in ENTITIES}
        )
        self.task = TaskAdaptation(cfg.out_dim, cfg.task_dim, cfg.dropout)

    def compressor(self, entity: str) -> MarcCompressor:
        """The shippable part for "users" or "items"."""
        return self.compressors[_part(entity)]  # type: ignore[return-value]

    def forward(self, x_u: Tensor, x_i: Tensor) -> Tensor:
        """Click logit (B,) from user and item states, each (B, D)."""
        logit, _, _ = self.task(self.compressor("users")(x_u), self.compressor("items")(x_i))
        return logit

    def loss(self, x_u: Tensor, x_i: Tensor, label: Tensor) -> MarcLoss:
        c_u, c_i = self.compressor("users"), self.compressor("items")
        z_u = c_u(x_u)  # (B, d)
        z_i = c_i(x_i)  # (B, d)
        logit, t_u, t_i = self.task(z_u, z_i)
        bce = nn.functional.binary_cross_entropy_with_logits(logit, label.float())
        s = self.cfg.kernel_scale
        keep = 0.5 * (
            normalised_hsic(c_u.standardise(x_u.float()), z_u, s)
            + normalised_hsic(c_i.standardise(x_i.float()), z_i, s)
        )
        indep = 0.5 * (normalised_hsic(z_u, t_u, s) + normalised_hsic(z_i, t_i, s))
        total = bce - self.cfg.keep_weight * keep + self.cfg.indep_weight * indep
        return MarcLoss(total, bce, keep, indep)
