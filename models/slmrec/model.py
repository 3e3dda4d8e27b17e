"""SLMRec student encoder: the teacher's first N decoder blocks, distilled block-wise to the teacher's states.

Notation: B texts in a batch, T padded tokens, H hidden size, M the teacher's tapped layer (its representation
is what the encode job publishes), N student blocks (N < M), K distillation points.

Paper (arXiv 2405.17890, official code WujiangXu/SLMRec): most intermediate layers are redundant; the student
keeps the first N blocks of the teacher; teacher and student are cut into K blocks and, at the end of each,
L = sum_k (1 - cos(h_s, h_t)) + 0.1 * ||h_s - h_t||_2 on the last token's hidden state. Here the teacher is
the teacher up to its tapped layer M (what the features use), so the points are evenly spaced over 1..M and
1..N and the last pair is (N, M): the student's last layer stands in for teacher layer M.

The states are the raw hidden states at the block boundaries, NOT unit-normalised (on unit vectors the L2 term
would be a function of the cosine and add nothing): the last token's state by default, as in the paper, or
mean pooling over the text's tokens (`pooling="mean"`, what the encoder publishes with `encode.pooling: mean`)
as an option. A state at a model's top block gets the final norm, as the encoder applies it there, so the
student's last point is the state it publishes (before the encoder's optional L2 normalisation, which the
cosine term ignores). No recommendation task loss: the downstream models (MARC, CTR) are trained on the
student's vectors afterwards, as on the teacher's.
Tuning: every student weight ("full") or low-rank adapters on the attention and MLP projections ("lora",
merged into the weights before saving, so the saved folder is a plain model).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from llmfeat.config import ConfigError
from llmfeat.models.encoder import decoder_blocks

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StudentConfig:
    student_layers: int = 8  # N
    teacher_layer: int = 15  # M
    blocks: int = 4  # K distillation points
    l2_weight: float = 0.1
    pooling: Literal["last", "mean"] = "last"  # the state at each block boundary: last token or token mean
    tuning: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        if not 1 <= self.student_layers < self.teacher_layer:
            raise ConfigError(
                f"slmrec.student_layers ({self.student_layers}) must be in 1..teacher_layer-1 "
                f"({self.teacher_layer - 1})"
            )
        if not 1 <= self.blocks <= self.student_layers:
            raise ConfigError(f"slmrec.blocks ({self.blocks}) must be in 1..student_layers")

    @property
    def teacher_points(self) -> tuple[int, ...]:
        return block_points(self.teacher_layer, self.blocks)

    @property
    def student_points(self) -> tuple[int, ...]:
        return block_points(self.student_layers, self.blocks)


def block_points(depth: int, blocks: int) -> tuple[int, ...]:
    """The last layer of each of `blocks` even blocks of 1..depth, e.g. (15, 4) -> (4, 8, 11, 15)."""
    return tuple(max(1, math.floor(depth * k / blocks + 0.5)) for k in range(1, blocks + 1))


# ---------------------------------------------------------------------------------------------- student


def make_student(teacher: nn.Module, n_layers: int) -> nn.Module:
    """A copy of the teacher's base model (embeddings, first `n_layers` blocks, final norm)."""
    student = copy.deepcopy(teacher)
    blocks = decoder_blocks(student)
    if n_layers >= len(blocks):
        raise ValueError(f"student_layers {n_layers} must be below the teacher's {len(blocks)} blocks")
    student.layers = nn.ModuleList(list(blocks)[:n_layers])
    config: Any = student.config
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]
    return student


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x with W frozen; B starts at zero, so training starts from the teacher."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Freeze the model and wrap every target projection in LoRA; returns the number of trainable weights."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())


# ---------------------------------------------------------------------------------------------- states


class _StopForward(Exception):
    """Raised by the hook at the deepest tapped block: nothing above it is computed."""


class BlockStates:
    """Un-normalised hidden states at chosen layers (the block boundaries) of a decoder, pooled as the encoder
    pools them (last token or mean over the text's tokens; final norm at the model's top block), with
    gradients. The forward pass stops after the deepest chosen layer (a teacher tapped at 15 of 30 runs 15
    blocks)."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], pooling: str = "last"):
        self.model, self.layers, self.pooling = model, layers, pooling
        blocks = decoder_blocks(model)
        self.depth = len(blocks)
        self.final_norm = getattr(model, "norm", None)
        self._raw: dict[int, torch.Tensor] = {}
        self._handles = [
            blocks[k - 1].register_forward_hook(self._hook(k, stop=k == max(layers) < self.depth))
            for k in sorted(set(layers))
        ]

    def remove(self) -> None:
        """Detach the hooks: the model runs as before."""
        for h in self._handles:
            h.remove()

    def _hook(self, k: int, stop: bool) -> Any:
        def hook(_m: nn.Module, _a: Any, output: Any) -> None:
            self._raw[k] = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            if stop:
                raise _StopForward

        return hook

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """input_ids, mask (B, T), right padded -> (B, K, H) pooled states, not normalised."""
        self._raw.clear()
        try:
            self.model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
        except _StopForward:
            pass
        lengths = mask.sum(1)  # (B,)
        out = []
        for k in self.layers:
            h = self._raw[k]
            if k == self.depth and self.final_norm is not None:
                h = self.final_norm(h)
            if self.pooling == "last":
                v = h[torch.arange(h.shape[0], device=h.device), lengths - 1].float()  # (B, H)
            else:
                v = (h * mask[..., None].to(h.dtype)).float().sum(1) / lengths[:, None]  # (B, H)
            out.append(v)
        return torch.stack(out, 1)  # (B, K, H)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, l2_weight: float = 0.1) -> torch.Tensor:
    """(B, K, H) un-normalised states at the K block boundaries -> mean over B of
    sum_k (1 - cos(s, t)) + l2_weight * ||s - t||_2 (the L2 term on the raw states, as in the paper)."""
    cos = nn.functional.cosine_similarity(student, teacher, dim=-1)  # (B, K)
    l2 = (student - teacher).norm(dim=-1)  # (B, K)
    return ((1 - cos) + l2_weight * l2).sum(1).mean()
