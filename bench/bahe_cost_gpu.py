"""BAHE against the full-LLM baseline on a GPU, like for like: time and peak memory, inference and training.

Random weights in SmolLM2-135M's exact shape (bench/encode_throughput.py): the same FLOPs and bytes as the
real checkpoint, so time and memory are those of the real weights. Token ids are random too; what is real are
the lengths: ML-100k's user texts, behaviour texts and behaviour sequences, counted with SmolLM2's tokenizer
and written once, here, to bench/bahe_lengths.npz (`--make-lengths`, from the lake).

    python bench/bahe_cost_gpu.py --make-lengths bench/bahe_lengths.npz              # here, once
    python bench/bahe_cost_gpu.py --lengths bench/bahe_lengths.npz --out $OUT/bahe_cost_gpu.json  # GPU

Phases (each with its own model, built on the device; peak memory from the end of the build, so the weights
as they run count and the CUDA context does not; median of `--repeats` timed runs after one warm-up, or one
run without warm-up where repeats is 1; eager bf16, no CUDA graphs, no torch.compile):
- inference at the cut (the published vectors): the baseline encodes every user's text up to layer
  `baseline_layer` (the executor-side LayerEncoder, blocks above it dropped); BAHE encodes each unique
  behaviour before the cut through blocks 1..split (the same encoder), then runs its `n` deep blocks over the
  behaviour sequences of the same users;
- the daily workload of the whole log (changed user-days: a user with new behaviour that day): the baseline
  re-encodes that user's text as of the end of the day; BAHE encodes the day's new behaviour texts (every
  behaviour is new on one day: all of them) and re-runs its deep blocks over that user's sequence;
- training, one epoch over the users with history: the same `n` trainable blocks (split+1..split+n, fp32
  weights, bf16 autocast, AdamW, a linear head on the last position) over behaviour sequences (BAHE) and over
  token sequences after a no-grad pass through the frozen blocks 1..split (fine-tuning on whole texts).
  Batching "users": 64 users a step, longest first (`bahe.users_per_batch`), so both see the same users per
  step; "budget": at most 8,192 padded positions a step (`bahe.position_budget`), which caps memory alike.
Groups (`--groups`), by what each side reads: "configured" (the encode job's user text, newest behaviours
within `encode.user_max_chars`; BAHE's sequence, up to `bahe.max_behaviors`), "text_behaviors" (BAHE over
only the behaviours the text holds) and "whole_text" (the text holding every behaviour of BAHE's sequence,
no character cap: the paper's whole behaviour texts; 8 users a step, one run each).
The encoder module is loaded by its file path, so only torch and transformers are needed on the GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_throughput import SMOLLM2_135M, EncoderConfig, LayerEncoder  # noqa: E402

MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------- lengths (here)


def make_lengths(out: Path, overrides: list[str]) -> None:
    """Token and sequence lengths from the lake, as spark_jobs/bahe_eval.py builds the texts; and the same
    users' texts holding every behaviour of their sequence (no character cap: the paper's whole texts)."""
    from datetime import UTC, datetime, timedelta

    from llmfeat.config import load_settings
    from llmfeat.delta_io import open_tables
    from llmfeat.models.encoder import resolve_model
    from llmfeat.spark_jobs.bahe_eval import count_tokens
    from llmfeat.user_text import HISTORY, SEP, history_cut_time, user_text

    settings = load_settings("local", overrides)
    tables, enc, cfg, max_len = open_tables(settings), settings.encode, settings.bahe, 512
    path = str(resolve_model(enc.model, enc.cache_dir).path)
    cut = history_cut_time(None, tables, cfg.history_cut)
    users = tables.read_arrow("users").to_pylist()
    b = tables.read_arrow("behaviors")
    texts = dict(zip(b["behavior_id"].to_pylist(), b["text"].to_pylist(), strict=True))
    assert not any(SEP in t for t in texts.values()), (
        "a behaviour text holds the separator: count differently"
    )
    ub = sorted(tables.read_arrow("user_behaviors").to_pylist(), key=lambda r: r["event_timestamp"])
    history: dict[str, list[tuple[Any, str]]] = {}
    first_seen: dict[str, Any] = {}
    for r in ub:
        history.setdefault(r["user_id"], []).append((r["event_timestamp"], texts[r["behavior_id"]]))
        first_seen.setdefault(r["behavior_id"], r["event_timestamp"])

    def text(u: dict[str, Any], end: datetime, whole: bool = False) -> str:
        most, chars = (cfg.max_behaviors, 10**9) if whole else (enc.user_max_behaviors, enc.user_max_chars)
        return user_text(u.get("age"), u.get("gender"), u.get("occupation"), history.get(u["user_id"], []),
                         end, most, chars)  # fmt: skip

    def sequence(u: str, end: datetime) -> int:
        return min(sum(t < end for t, _ in history.get(u, [])), cfg.max_behaviors)

    def held(t: str) -> int:  # behaviours a user text holds
        return len(t.split(HISTORY, 1)[1].split(SEP)) if HISTORY in t else 0

    by_id = {u["user_id"]: u for u in users}
    days: list[tuple[dict[str, Any], datetime]] = []  # changed user-days, as bahe_eval.user_day_stats
    for u, events in history.items():
        for day in sorted({t.date() for t, _ in events}):
            days.append((by_id[u], datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)))
    user_texts = [text(u, cut) for u in users]
    day_texts = [text(u, end) for u, end in days]
    b_ids = list(first_seen)
    arrays = {
        "user_tokens": count_tokens(path, user_texts, max_len),  # (U,) the user's text at the cut
        "user_positions": np.array([sequence(u["user_id"], cut) for u in users], np.int64),  # (U,)
        "user_text_behaviors": np.array([held(t) for t in user_texts], np.int64),  # (U,)
        "user_whole_tokens": count_tokens(path, [text(u, cut, True) for u in users], 10**6),  # (U,)
        "behavior_tokens": count_tokens(path, [texts[i] for i in b_ids], max_len),  # (B,) each unique once
        "behavior_before_cut": np.array([first_seen[i] < cut for i in b_ids]),  # (B,)
        "day_user_tokens": count_tokens(path, day_texts, max_len),  # (D,) the text at the end of the day
        "day_positions": np.array([sequence(u["user_id"], end) for u, end in days], np.int64),  # (D,)
        "day_text_behaviors": np.array([held(t) for t in day_texts], np.int64),  # (D,)
        "day_whole_tokens": count_tokens(path, [text(u, end, True) for u, end in days], 10**6),  # (D,)
        "records": np.int64(len(ub)),
        "cut": np.array(cut.isoformat()),
    }
    np.savez_compressed(out, **arrays)
    for k, v in arrays.items():
        print(k, v.shape, v.sum() if v.dtype.kind in "ib" else v, v.max() if v.dtype.kind in "ib" else "")


# ---------------------------------------------------------------------------------------------- models (GPU)


def random_llama(layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """SmolLM2-135M's shape with `layers` blocks and random weights, initialised on the device."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}))  # type: ignore[arg-type]
    return model.to(dtype=dtype)


class LengthTokenizer:
    """Texts are keys of pre-drawn random token ids: real lengths, no tokenising cost. LayerEncoder calls it
    as a slow tokenizer (no `_tokenizer` backend)."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self, lengths: np.ndarray, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = {str(i): rng.integers(1, vocab, int(n)).tolist() for i, n in enumerate(lengths)}

    def texts(self) -> list[str]:
        return list(self.ids)

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.ids[t] for t in texts]}


def length_batches(lengths: np.ndarray, per_batch: int | None, budget: int | None) -> list[np.ndarray]:
    """Indices longest first: `per_batch` sequences a batch, or as many as `budget` padded positions hold."""
    order = np.argsort(-lengths, kind="stable")
    out, s = [], 0
    while s < len(order):
        size = per_batch or max(1, budget // max(1, int(lengths[order[s]])))  # type: ignore[operator]
        out.append(order[s : s + size])
        s += size
    return out


def deep_blocks(layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """BAHE's deep part as models/bahe/model.llm_blocks builds it: `layers` blocks, rotary, final norm, no
    vocabulary table (inputs are behaviour vectors)."""
    model = random_llama(layers, device, dtype, seed=1)
    model.embed_tokens = torch.nn.Embedding(1, int(SMOLLM2_135M["hidden_size"]), device=device)  # type: ignore[arg-type]
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(device: torch.device, build: Callable[[], Any], run: Callable[[Any], dict[str, Any]],
             repeats: int) -> dict[str, Any]:  # fmt: skip
    """Build the phase's model, one warm-up (none when repeats is 1: long phases, after the kernels were
    warmed by the phases before), then `repeats` timed runs: median seconds and the peak device
    memory of the phase (weights, inputs, activations, optimiser state; the CUDA context and the fp32 copy
    of the weights while they are built are excluded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    state = build()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # from here: the weights as they run, and everything else
    info = run(state) if repeats > 1 else {}
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        info = run(state)
        sync(device)
        times.append(time.perf_counter() - started)
    out = {**info, "seconds": statistics.median(times), "seconds_all": times}
    if device.type == "cuda":
        out["peak_allocated_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    del state
    return out


# ---------------------------------------------------------------------------------------------- phases


def encode_phase(lengths: np.ndarray, layer: int, budget: int, device: torch.device, repeats: int) -> dict:
    """The executor-side encoder stopped at `layer` (a model of layer+1 blocks, so the tap is not the last
    block and no final norm runs) over texts of the given token lengths (none is cut)."""

    def build() -> Any:
        tok = LengthTokenizer(lengths, int(SMOLLM2_135M["vocab_size"]))
        longest = max(512, int(lengths.max()))
        cfg = EncoderConfig(layers=(layer,), max_length=longest, token_budget=max(budget, longest),
                            max_batch=8192, cuda_graphs=False, log_every_s=1e9)  # fmt: skip
        return LayerEncoder(random_llama(layer + 1, device, torch.float32), tok, cfg, device), tok.texts()

    def run(state: Any) -> dict[str, Any]:
        enc, texts = state
        out = enc.encode(texts)
        return {"sequences": len(texts), "tokens": out.tokens, "blocks": layer}

    return measured(device, build, run, repeats)


def deep_infer_phase(lengths: np.ndarray, deep: int, budget: int, n_behaviors: int, device: torch.device,
                     repeats: int) -> dict:  # fmt: skip
    """BAHE's deep blocks over behaviour sequences (bf16, inference): gather each batch's vectors from the
    behaviour table on the device, run the blocks, mean-pool each sequence."""
    lengths = lengths[lengths > 0]
    width = int(SMOLLM2_135M["hidden_size"])
    rng = np.random.default_rng(0)
    batches = []
    for rows in length_batches(lengths, None, budget):
        t = int(lengths[rows[0]])
        mask = torch.arange(t)[None] < torch.from_numpy(lengths[rows])[:, None]  # (B, T)
        batches.append((torch.from_numpy(rng.integers(0, n_behaviors, (len(rows), t))), mask))

    def build() -> Any:
        table = torch.randn(n_behaviors, width, device=device, dtype=torch.bfloat16)  # behaviour table
        return deep_blocks(deep, device, torch.bfloat16).eval(), table

    def run(state: Any) -> dict[str, Any]:
        blocks, table = state
        with torch.inference_mode():
            for ids, mask in batches:
                m = mask.to(device, non_blocking=True)
                x = table[ids.to(device, non_blocking=True)]  # (B, T, D)
                h = blocks(inputs_embeds=x, attention_mask=m.long(), use_cache=False).last_hidden_state
                (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, D) the user state
        return {"sequences": len(lengths), "tokens": int(lengths.sum()), "blocks": deep}

    return measured(device, build, run, repeats)


def train_phase(lengths: np.ndarray, split: int, deep: int, frozen: bool, per_batch: int | None, budget: int,
                device: torch.device, repeats: int) -> dict:  # fmt: skip
    """One epoch of `deep` trainable blocks; frozen=True: over token sequences after the frozen blocks
    1..split (no grad), frozen=False: over behaviour vectors (BAHE). per_batch users a step, else as many
    as `budget` padded positions hold."""
    lengths = lengths[lengths > 0]
    width, vocab = int(SMOLLM2_135M["hidden_size"]), int(SMOLLM2_135M["vocab_size"])
    rng = np.random.default_rng(0)
    plan = length_batches(lengths, per_batch, budget)
    batches = []
    for rows in plan:
        t = int(lengths[rows[0]])
        mask = torch.arange(t)[None] < torch.from_numpy(lengths[rows])[:, None]  # (B, T)
        x = torch.from_numpy(rng.integers(0, vocab, (len(rows), t))) if frozen else None
        batches.append((x, mask, torch.from_numpy(rng.integers(0, 2, len(rows))).float()))

    def build() -> Any:
        shallow = None
        if frozen:
            shallow = random_llama(split, device, torch.bfloat16).eval()
            shallow.norm = torch.nn.Identity()  # the split layer's raw state feeds the trainable blocks
            shallow.requires_grad_(False)
        blocks = deep_blocks(deep, device, torch.float32).train()
        head = torch.nn.Linear(width, 1).to(device)
        params = [*blocks.parameters(), *head.parameters()]
        return shallow, blocks, head, torch.optim.AdamW(params, lr=1e-5), sum(p.numel() for p in params)

    def run(state: Any) -> dict[str, Any]:
        shallow, blocks, head, opt, n_params = state
        for ids, mask, label in batches:
            m = mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if shallow is not None:
                    with torch.no_grad():
                        x = shallow(input_ids=ids.to(device, non_blocking=True), attention_mask=m.long(),
                                    use_cache=False).last_hidden_state  # fmt: skip
                else:
                    x = torch.randn(*m.shape, width, device=device)  # (B, T, D) behaviour vectors
                h = blocks(inputs_embeds=x, attention_mask=m.long(), use_cache=False).last_hidden_state
                logit = head(h[torch.arange(len(m), device=device), m.sum(1) - 1]).squeeze(-1).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {"sequences": len(lengths), "tokens": int(lengths.sum()), "steps": len(plan),
                "padded_positions": int(sum(len(r) * int(lengths[r[0]]) for r in plan)),
                "blocks": split + deep if frozen else deep, "trainable_blocks": deep,
                "trainable_parameters": n_params}  # fmt: skip

    return measured(device, build, run, repeats)


# ---------------------------------------------------------------------------------------------- the run


def plan_phases(
    d: Any, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, Callable[[], dict]]]:
    """(name, phase) in the order they run. Groups: "configured" (the baseline's text as the encode job
    builds it: newest behaviours within encode.user_max_chars; BAHE's sequence: up to bahe.max_behaviors),
    "text_behaviors" (BAHE over only the behaviours the baseline's text holds) and "whole_text" (the
    baseline's text holding every behaviour of BAHE's sequence: the paper's whole behaviour texts)."""
    lim = slice(0, args.limit)
    x = {k: d[k][lim] for k in d.files if k.startswith(("user_", "day_"))}
    beh_cut = d["behavior_tokens"][d["behavior_before_cut"]][lim]
    beh_all = d["behavior_tokens"][lim]
    has = x["user_positions"] > 0  # training: the users with history, the same on both sides
    split, layer, ib, tb = args.split, args.baseline_layer, args.infer_budget, args.train_budget
    groups = args.groups.split(",")
    out: list[tuple[str, Callable[[], dict]]] = [
        ("infer_behaviors_cut", partial(encode_phase, beh_cut, split, ib, device, args.repeats)),
        ("infer_behaviors_daily", partial(encode_phase, beh_all, split, ib, device, args.repeats)),
        ("configured/infer_baseline_cut",
         partial(encode_phase, x["user_tokens"], layer, ib, device, args.repeats)),
        ("configured/infer_baseline_daily",
         partial(encode_phase, x["day_user_tokens"], layer, ib, device, args.repeats)),
    ]  # fmt: skip

    def train(group: str, n: int, tokens: np.ndarray, positions: np.ndarray, per_batch: int | None,
              repeats: int) -> None:  # fmt: skip
        tag = f"users{per_batch}" if per_batch else f"budget{tb}"
        for side, frozen, lengths in (("tokens", True, tokens), ("bahe", False, positions)):
            phase = partial(train_phase, lengths[has], split, n, frozen, per_batch, tb, device, repeats)
            out.append((f"{group}/train_{side}_{tag}_n{n}", phase))

    sequences = {"configured": "positions", "text_behaviors": "text_behaviors"}
    for n in args.deep:
        for group in [g for g in groups if g in sequences]:
            cut_pos, day_pos = x[f"user_{sequences[group]}"], x[f"day_{sequences[group]}"]
            for where, pos, table in (("cut", cut_pos, len(beh_cut)), ("daily", day_pos, len(beh_all))):
                phase = partial(deep_infer_phase, pos, n, ib, table, device, args.repeats)
                out.append((f"{group}/infer_deep_{where}_n{n}", phase))
            train(group, n, x["user_tokens"], cut_pos, args.users_per_batch, args.train_repeats)
            train(group, n, x["user_tokens"], cut_pos, None, args.train_repeats)
    if "whole_text" in groups:  # long texts: one timed run each
        whole, positions = x["user_whole_tokens"], x["user_positions"]
        out.append(("whole_text/infer_baseline_cut", partial(encode_phase, whole, layer, ib, device, 1)))
        out.append(("whole_text/infer_baseline_daily",
                    partial(encode_phase, x["day_whole_tokens"], layer, ib, device, 1)))  # fmt: skip
        for n in args.deep:
            train("whole_text", n, whole, positions, args.whole_users_per_batch, 1)
        train("whole_text", args.deep[0], whole, positions, None, 1)
    return out


def on_gpu(args: argparse.Namespace) -> dict[str, Any]:
    d = np.load(args.lengths)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "weights": "random, SmolLM2-135M shape (30 x 576, GQA 9/3, vocab 49152)",
        "precision": "bf16 inference; training fp32 weights + bf16 autocast, AdamW",
        "split_layer": args.split,
        "baseline_layer": args.baseline_layer,
        "infer_budget": args.infer_budget,
        "train_budget": args.train_budget,
        "repeats": args.repeats,
        "train_repeats": args.train_repeats,
        "records": int(d["records"]),
        "changed_user_days": len(d["day_user_tokens"]),
        "cut": str(d["cut"]),
        "phases": {},
    }
    started = time.perf_counter()
    for name, phase in plan_phases(d, args, device):
        try:
            row = phase()
        except torch.OutOfMemoryError as err:
            row = {"error": f"out of memory: {str(err)[:200]}"}
            gc.collect()
            torch.cuda.empty_cache()
        result["phases"][name] = row
        if args.out:  # after every phase: a run stopped at its time limit keeps what it measured
            args.out.write_text(json.dumps(result, indent=1))
        if "error" in row:
            print(f"{time.perf_counter() - started:6.0f}s {name:44s} {row['error'][:80]}", flush=True)
            continue
        at, mem = time.perf_counter() - started, row.get("peak_allocated_mib", 0.0)
        cells = (
            f"{row['sequences']:5d} seq {row['tokens']:8d} tok {row['blocks']:2d} blk {row['seconds']:8.4f} s"
        )
        print(f"{at:5.0f}s {name:42s} {cells} {mem:8.1f} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-lengths", type=Path, default=None, help="write the lengths file (here)")
    parser.add_argument("--set", action="append", default=[], help="settings overrides for --make-lengths")
    parser.add_argument("--lengths", type=Path, default=Path(__file__).parent / "bahe_lengths.npz")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--split", type=int, default=10)
    parser.add_argument("--baseline-layer", type=int, default=15)
    parser.add_argument("--deep", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--groups", default="configured,text_behaviors,whole_text")
    parser.add_argument("--infer-budget", type=int, default=65536, help="tokens (positions) per forward")
    parser.add_argument("--train-budget", type=int, default=8192, help="bahe.position_budget")
    parser.add_argument("--users-per-batch", type=int, default=64, help="bahe.users_per_batch")
    parser.add_argument("--whole-users-per-batch", type=int, default=8, help="whole texts: fewer fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N of each workload (a quick check)")
    args = parser.parse_args()
    if args.make_lengths:
        make_lengths(args.make_lengths, args.set)
        return
    on_gpu(args)


if __name__ == "__main__":
    main()
