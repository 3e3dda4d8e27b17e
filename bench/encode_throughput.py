"""Encode throughput: the executor-side encoder (llmfeat.models.encoder.LayerEncoder) against a naive HF loop.

Random weights in SmolLM2-135M's exact shape (30 layers x 576, GQA 9/3 heads, vocab 49152): the same FLOPs as
the real checkpoint, so the numbers hold for it. Texts are real ML-100k item and user texts (written by
`--make-texts` from the Delta tables) with SmolLM2's own tokenizer; both are files, so this runs where neither
Spark nor the GGUF reader is installed.

    # here: texts and tokenizer into an ignored folder that travels with the device call
    python bench/encode_throughput.py --make-texts .bench
    # on the GPU machine (--profile adds where the time goes: host, GPU and kernels, items, compiled)
    python bench/encode_throughput.py --texts .bench --out $OUT/encode_throughput.json --profile

Rates count real (unpadded) tokens; tokenisation is inside the encoder's timed region, as in a Spark task.
The encoder module is loaded by its file path (it imports nothing from this project), so neither this package
nor its dependencies beyond torch and transformers are needed there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def encoder_module() -> ModuleType:
    """models/encoder.py as llmfeat.models.encoder, loaded by path: the package need not be installed."""
    name = "llmfeat.models.encoder"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "models" / "encoder.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


EncoderConfig = encoder_module().EncoderConfig
LayerEncoder = encoder_module().LayerEncoder

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def random_smollm2(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    return LlamaModel(LlamaConfig(**SMOLLM2_135M)).eval()  # type: ignore[arg-type]


def make_texts(out: Path, data_dir: str) -> None:
    """Real item texts and user texts (demographics + newest ratings, 800 characters: about 300 tokens)."""
    from datetime import UTC, datetime

    from deltalake import DeltaTable

    from llmfeat.user_text import user_text

    resolve_model = encoder_module().resolve_model

    out.mkdir(parents=True, exist_ok=True)
    delta = Path(data_dir) / "delta"
    items = DeltaTable(str(delta / "items")).to_pyarrow_table()["text"].to_pylist()
    history = DeltaTable(str(delta / "user_behaviors")).to_pyarrow_table().to_pylist()
    texts = {
        r["behavior_id"]: r["text"]
        for r in DeltaTable(str(delta / "behaviors")).to_pyarrow_table().to_pylist()
    }
    per_user: dict[str, list] = {}
    for r in history:
        per_user.setdefault(r["user_id"], []).append((r["event_timestamp"], texts[r["behavior_id"]]))
    far = datetime(2100, 1, 1, tzinfo=UTC)
    users = [
        user_text(u["age"], u["gender"], u["occupation"], per_user.get(u["user_id"], []), far, 50, 800)
        for u in DeltaTable(str(delta / "users")).to_pyarrow_table().to_pylist()
    ]
    (out / "items.json").write_text(json.dumps(items))
    (out / "users.json").write_text(json.dumps(users))
    source = resolve_model("smollm2", "~/.cache/llmfeat/models")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / "tokenizer").mkdir(exist_ok=True)
        (out / "tokenizer" / name).write_bytes((source.path / name).read_bytes())
    print(f"wrote {len(items)} item and {len(users)} user texts and the tokenizer to {out}")


def naive(model: torch.nn.Module, tokenizer, texts: list[str], layer: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """fp32, full depth, every hidden state, unsorted, fixed batch 64: what a first script does."""
    model = model.to(device=device, dtype=torch.float32)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(texts), 64):
        batch = tokenizer(
            texts[i : i + 64], padding=True, truncation=True, max_length=512, return_tensors="pt"
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            hs = model(**batch, output_hidden_states=True).hidden_states[layer]
        m = batch["attention_mask"].unsqueeze(-1)
        _ = ((hs * m).sum(1) / m.sum(1)).cpu()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANTS = (  # (label, layers, compile, CUDA graphs); the first is the reference for the cosine
    ("eager, no CUDA graphs", (15,), False, False),
    ("eager", (15,), False, True),
    ("compiled", (15,), True, True),
    ("layers [8, 15, 22, 30], compiled", (8, 15, 22, 30), True, True),
)


def run(texts_dir: Path, out: Path | None, repeats: int, profile: bool) -> None:
    from transformers import AutoTokenizer

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(texts_dir / "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = {k: json.loads((texts_dir / f"{k}.json").read_text()) for k in ("items", "users")}
    # Enough texts per call to keep the GPU busy for seconds: the real texts, repeated.
    workloads = {"items": base["items"] * 30, "users": base["users"] * 10}
    results, profiles = [], []
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    for name, texts in workloads.items():
        lengths = np.array([len(x) for x in tokenizer(texts[:5000])["input_ids"]])
        print(f"{name}: {len(texts)} texts, mean {lengths.mean():.0f} tokens", flush=True)
        sample = texts[: 4096 if name == "items" else 1024]
        n_tok = sum(min(len(x), 512) for x in tokenizer(sample)["input_ids"])
        secs = naive(random_smollm2(), tokenizer, sample, 15, device)
        results.append(
            row(name, "naive: fp32, full depth, all hidden states, unsorted, batch 64", sample, n_tok, secs)
        )
        print(results[-1], flush=True)
        reference = None
        for label, layers, compiled, graphs in VARIANTS:
            cfg = EncoderConfig(
                layers=layers,
                max_length=512,
                token_budget=131072,
                max_batch=8192,
                compile=compiled,
                cuda_graphs=graphs,
            )
            encoder = LayerEncoder(random_smollm2(), tokenizer, cfg, device)
            sync(device)
            start = time.perf_counter()
            first = encoder.encode(texts)  # warm-up: CUDA context, kernels, allocator, compilation
            sync(device)
            warmup = time.perf_counter() - start
            encoder.encode(texts)  # each pack shape's second sighting: its CUDA graph is captured
            times, tokens = [], 0
            for _ in range(repeats):
                sync(device)
                got = encoder.encode(texts)
                sync(device)
                times.append(got.seconds)
                tokens = got.tokens
            extra: dict[str, Any] = {"first_call_s": warmup, "cuda_graphs": len(encoder.graphs)}
            if layers == (15,):  # every variant against the eager one, without graphs: bf16, same vectors
                if reference is None:
                    reference = got.vectors
                extra["min_cosine_vs_eager"] = float((reference * got.vectors).sum(-1).min())
            variant = f"encoder: packed, bf16, stop at {max(layers)}, " + (
                label if len(layers) > 1 else f"layers [15], {label}"
            )
            results.append(row(name, variant, texts, tokens, statistics.median(times)) | extra)
            print(results[-1], flush=True)
            if profile and compiled and layers == (15,) and name == "items":
                profiles.append(where_the_time_goes(encoder, texts, f"{name}, {variant}"))
            del encoder, first
            torch.cuda.empty_cache()
        start = time.perf_counter()
        tokenizer(texts, truncation=False)
        results.append(
            row(
                name,
                "HF tokenizer(texts) alone",
                texts,
                int(lengths.mean() * len(texts)),
                time.perf_counter() - start,
            )
        )
        print(results[-1], flush=True)
    print("\n| workload | variant | texts | texts/s | real tokens/s | min cosine |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rates = f"{r['texts_per_s']:,.0f} | {r['tokens_per_s']:,.0f}"
        cos = f"{r['min_cosine_vs_eager']:.5f}" if "min_cosine_vs_eager" in r else ""
        print(f"| {r['workload']} | {r['variant']} | {r['texts']:,} | {rates} | {cos} |")
    if out:
        record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "results": results, "profiles": profiles}  # fmt: skip
        out.write_text(json.dumps(record, indent=1))


def where_the_time_goes(encoder: Any, texts: list[str], label: str) -> dict:
    """The host side alone (tokenise, pack, lay out, in the encoder's threads), the GPU side alone (the
    same packs, prepared beforehand), one encode() call's timeline (when the GPU ran each pack, how long
    this thread waited for prepared chunks), and the GPU kernels by time."""
    device = encoder.device
    start = time.perf_counter()
    chunks = list(encoder._prepared(texts))
    host_s = time.perf_counter() - start
    tokens = sum(int(c.lengths.sum()) for c in chunks)

    def forward() -> None:
        with torch.inference_mode():
            for c in chunks:
                for shape, _, _, host in c.packs:
                    encoder._run(host, shape)

    forward()
    sync(device)
    start = time.perf_counter()
    forward()
    sync(device)
    gpu_s = time.perf_counter() - start

    marks: list[tuple[Any, Any]] = []
    waits: list[float] = []
    run, prepared = encoder._run, encoder._prepared

    def timed_run(host: torch.Tensor, shape: tuple[int, int, int]) -> Any:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        got = run(host, shape)
        end.record()
        marks.append((begin, end))
        return got

    def timed_prepared(batch: list[str]) -> Any:
        chunks = prepared(batch)
        while True:
            start = time.perf_counter()
            chunk = next(chunks, None)
            waits.append(time.perf_counter() - start)
            if chunk is None:
                return
            yield chunk

    encoder._run, encoder._prepared = timed_run, timed_prepared
    sync(device)
    zero = torch.cuda.Event(enable_timing=True)
    zero.record()
    wall = encoder.encode(texts).seconds
    sync(device)
    del encoder._run, encoder._prepared
    spans = [(zero.elapsed_time(b) / 1e3, zero.elapsed_time(e) / 1e3) for b, e in marks]
    gaps = sum(max(0.0, spans[i][0] - spans[i - 1][1]) for i in range(1, len(spans)))

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        sync(device)
    kernels: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += e.device_time_total / 1e6
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    found = {
        "label": label,
        "tokens": tokens,
        "host_side_alone_s": host_s,
        "gpu_side_alone_s": gpu_s,
        "encode_s": wall,
        "encode_first_pack_at_s": spans[0][0],
        "encode_gpu_gaps_s": gaps,
        "encode_waits_for_prepared_chunks_s": sum(waits),
        "packs": len(spans),
        "kernel_s": total,
        "kernels": [{"kernel": k[:120], "s": round(v, 4), "share": round(v / total, 3)} for k, v in top],
    }
    print(f"where the time goes ({label}): host side alone {host_s:.3f} s ({tokens / host_s:,.0f} tok/s), "
          f"GPU side alone {gpu_s:.3f} s ({tokens / gpu_s:,.0f} tok/s); encode {wall:.3f} s: first pack at "
          f"{spans[0][0]:.3f} s, GPU idle between packs {gaps:.3f} s, waiting for prepared chunks "
          f"{sum(waits):.3f} s; kernels {total:.3f} s", flush=True)  # fmt: skip
    for k, v in top:
        print(f"   {v * 1e3:8.1f} ms {v / total:6.1%}  {k[:100]}", flush=True)
    return found


def row(workload: str, variant: str, texts: list[str], tokens: int, seconds: float) -> dict:
    return {
        "workload": workload,
        "variant": variant,
        "texts": len(texts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "texts_per_s": len(texts) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-texts", type=Path, help="write texts and tokenizer here, then stop")
    parser.add_argument("--data-dir", default="data/local", help="where `llmfeat ingest` wrote its tables")
    parser.add_argument("--texts", type=Path, default=Path(".bench"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also where the time goes (items, compiled)")
    args = parser.parse_args()
    if args.make_texts:
        make_texts(args.make_texts, args.data_dir)
    else:
        run(args.texts, args.out, args.repeats, args.profile)


if __name__ == "__main__":
    main()
