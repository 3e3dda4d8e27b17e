"""BAHE (docs/methods.md, arXiv 2403.19347): the deep, trainable part of behaviour aggregated hierarchical
encoding.

Notation: B users in a batch, T behaviour positions, D behaviour-vector width (the LLM's width at the split
layer), d published user-vector width, R CTR rows, I items, E head width.

The LLM's shallow layers (1..split) have already turned every unique behaviour text into one pooled vector
(the behaviour table, `behaviors_repr`). Here, per user:

    behaviour vectors (B, T, D) --BehaviorInput--> (B, T, D) --DeepLayers (causal)--> (B, T, D)
        --PrefixPool--> the pooled user state after each prefix (B, T, D)
        --UserCompression (MARC compressor, optional)--> user vectors (B, T, d)
    user vector (R, d) + item id --CtrHead--> click logit (R,)

Causal attention makes position k see behaviours 0..k only, so one pass per user gives the user vector
"before" every one of its rows; the row picks prefix k-1 when k behaviours precede it. A user (or row) with
no behaviour gets a learned fallback state, flagged as such by the caller (BehaviorSequences.no_history).

Not public, so parameters here (the simplest faithful choice first): the deep part is `deep_layers` decoder
blocks copied from the LLM above the split ("llm") or a fresh pre-norm transformer of the same width
("small"); pooling is the mean over the prefix ("mean") or its last position ("last"); behaviour vectors are
unit-norm (encode.normalize: l2), so they enter scaled by a learnable gain; the compressor is MARC's
(models/marc/model.py) with its keep-information HSIC term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from llmfeat.models.marc.model import MarcCompressor, normalised_hsic

DeepKind = Literal["llm", "small"]
Pooling = Literal["mean", "last"]


@dataclass(frozen=True)
class BaheConfig:
    width: int = 576  # D
    n_items: int = 1  # I
    deep: DeepKind = "small"
    deep_layers: int = 2
    heads: int = 9
    input_gain: float = 24.0
    pooling: Pooling = "mean"
    max_positions: int = 1024  # positional table of the small transformer
    compress: bool = True
    out_dim: int = 64  # d (the width of `width` when compress is off)
    compress_hidden: int = 256
    keep_weight: float = 0.1
    emb_dim: int = 32  # E
    dropout: float = 0.1

    @property
    def user_dim(self) -> int:
        return self.out_dim if self.compress else self.width


# ---------------------------------------------------------------------------------------------- parts


class BehaviorInput(nn.Module):
    """Unit-norm behaviour vectors (B, T, D) -> the scale the deep layers expect (B, T, D)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class SmallTransformer(nn.Module):
    """A fresh causal pre-norm transformer of width D with learned positions: (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, layers: int, heads: int, max_positions: int, dropout: float):
        super().__init__()
        self.position = nn.Embedding(max_positions, width)
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        t = x.shape[1]
        h = x + self.position(torch.arange(t, device=x.device))  # (B, T, D)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=x.dtype)
        # right padding under a causal mask: real positions never attend to padding, so no key mask is needed
        return self.norm(self.blocks(h, mask=causal, is_causal=True))  # (B, T, D)


class LlmBlocks(nn.Module):
    """Decoder blocks of a Hugging Face base model (Llama family) over inputs (B, T, D) -> (B, T, D).

    Built by `llm_blocks`, which keeps blocks split+1..split+n, the rotary embedding and the final norm.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self.base(inputs_embeds=x, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]


def llm_blocks(base: nn.Module, split: int, n: int) -> LlmBlocks:
    """A loaded base model (AutoModel, no LM head) -> its blocks split+1..split+n as trainable layers.

    The token embedding is dropped (inputs are behaviour vectors), so is every block outside the range.
    """
    from llmfeat.models.encoder import EncoderError, decoder_blocks

    blocks = list(decoder_blocks(base))
    if split + n > len(blocks):
        raise EncoderError(
            f"bahe: blocks {split + 1}..{split + n} requested but the model has {len(blocks)} (lower "
            "bahe.layer or bahe.deep_layers)"
        )
    base.layers = nn.ModuleList(blocks[split : split + n])
    for i, block in enumerate(base.layers):  # cache slots are indexed by position in the stack
        if hasattr(block, "self_attn"):
            attn: Any = block.self_attn
            attn.layer_idx = i
    config: Any = base.config
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[split : split + n]
    width = int(config.hidden_size)
    base.embed_tokens = nn.Embedding(1, width)  # unused with inputs_embeds; frees the vocabulary table
    return LlmBlocks(base)


class PrefixPool(nn.Module):
    """Deep states (B, T, D) -> pooled state after each prefix (B, T, D): running mean, or the position."""

    def __init__(self, pooling: Pooling):
        super().__init__()
        self.pooling = pooling

    def forward(self, h: Tensor) -> Tensor:
        if self.pooling == "last":
            return h  # causal: position k already summarises 0..k
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)  # (T,)
        return h.cumsum(1) / counts[None, :, None]  # (B, T, D); right padding only follows real positions


class CtrHead(nn.Module):
    """User vectors (R, d) and item ids (R,) -> click logit (R,). Training only; the user vector ships."""

    def __init__(self, user_dim: int, n_items: int, emb_dim: int, dropout: float):
        super().__init__()
        self.user = nn.Sequential(nn.LayerNorm(user_dim), nn.Linear(user_dim, emb_dim))
        self.item = nn.Embedding(n_items, emb_dim)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.item.weight, std=0.01)
        nn.init.zeros_(self.item_bias.weight)
        self.over = nn.Sequential(
            nn.Linear(3 * emb_dim, emb_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(emb_dim, 1)
        )

    def forward(self, user: Tensor, item: Tensor) -> Tensor:
        u, e = self.user(user), self.item(item)  # (R, E) each
        return self.over(torch.cat([u, e, u * e], -1)).squeeze(-1) + self.item_bias(item).squeeze(-1)


# ---------------------------------------------------------------------------------------------- the model


class Bahe(nn.Module):
    """The deep part, the optional compressor, the fallback state and the training head."""

    def __init__(self, cfg: BaheConfig, deep: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.input = BehaviorInput(cfg.input_gain)
        self.deep = deep or SmallTransformer(
            cfg.width, cfg.deep_layers, cfg.heads, cfg.max_positions, cfg.dropout
        )
        self.pool = PrefixPool(cfg.pooling)
        self.fallback = nn.Parameter(torch.zeros(cfg.width))  # (D,): the state of a user with no behaviour
        self.compressor: nn.Module = (
            MarcCompressor(cfg.width, cfg.out_dim, cfg.compress_hidden, cfg.dropout)
            if cfg.compress
            else nn.Identity()
        )
        self.head = CtrHead(cfg.user_dim, cfg.n_items, cfg.emb_dim, cfg.dropout)

    def prefix_states(self, x: Tensor, mask: Tensor) -> Tensor:
        """Behaviour vectors (B, T, D), mask (B, T) -> pooled state after each prefix (B, T, D)."""
        return self.pool(self.deep(self.input(x), mask))

    def pick(self, prefixes: Tensor, row_user: Tensor, k: Tensor) -> Tensor:
        """The state before each row: prefixes (B, T, D), batch position (R,), behaviours before it (R,)
        -> (R, D); k = 0 takes the fallback state."""
        at = prefixes[row_user, (k - 1).clamp_min(0)]  # (R, D)
        return torch.where((k > 0)[:, None], at, self.fallback.expand_as(at))

    def user_vector(self, state: Tensor) -> Tensor:
        return self.compressor(state)  # (R, D) -> (R, d)

    def forward(self, x: Tensor, mask: Tensor, row_user: Tensor, k: Tensor, item: Tensor) -> Tensor:
        """Click logits (R,) for rows of the B users in x."""
        return self.head(self.user_vector(self.pick(self.prefix_states(x, mask), row_user, k)), item)

    def keep_term(self, state: Tensor, max_rows: int = 512) -> Tensor:
        """nHSIC(state, compressed state) on up to max_rows rows (0 without a compressor): maximised."""
        if not self.cfg.compress or len(state) < 4:
            return state.new_zeros(())
        s = state[:max_rows]
        assert isinstance(self.compressor, MarcCompressor)
        return normalised_hsic(self.compressor.standardise(s), self.compressor(s))


def build_bahe(cfg: BaheConfig, base: nn.Module | None = None, split: int = 0) -> Bahe:
    """deep="llm" needs `base` (a loaded base model) and the split layer; "small" needs neither."""
    if cfg.deep == "llm":
        if base is None:
            raise ValueError("bahe.deep is llm: pass the loaded base model")
        return Bahe(cfg, llm_blocks(base, split, cfg.deep_layers).float())
    return Bahe(cfg)


def count_parameters(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


__all__ = ["Bahe", "BaheConfig", "build_bahe", "count_parameters", "llm_blocks"]
