"""Encode throughput: the executor-side encoder (llmfeat.models.encoder.LayerEncoder) against a naive HF loop.

Random weights in SmolLM2-135M's exact shape (30 layers x 576, GQA 9/3 heads, vocab 49152): the same FLOPs as
the real checkpoint, so the numbers hold for it. Texts are real ML-100k item and user texts (written by
`--make-texts` from the Delta tables) with SmolLM2's own tokenizer; both are files, so this runs where neither
Spark nor the GGUF reader is installed.

    # here: texts and tokenizer into an ignored folder that travels with the device call
    python bench/encode_throughput.py --make-texts .bench
    # on the GPU machine
    python bench/encode_throughput.py --texts .bench --out $OUT/encode_throughput.json

Rates count real (unpadded) tokens; tokenisation is inside the encoder's timed region, as in a Spark task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmfeat.models.encoder import EncoderConfig, LayerEncoder  # noqa: E402

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

    from llmfeat.models.encoder import resolve_model
    from llmfeat.spark_jobs.user_text import user_text

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


def run(texts_dir: Path, out: Path | None, repeats: int) -> None:
    from transformers import AutoTokenizer

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(texts_dir / "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = {k: json.loads((texts_dir / f"{k}.json").read_text()) for k in ("items", "users")}
    # Enough texts per call to keep the GPU busy for seconds: the real texts, repeated.
    workloads = {"items": base["items"] * 30, "users": base["users"] * 10}
    results = []
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
        for layers, compiled in (((15,), False), ((15,), True), ((8, 15, 22, 30), True)):
            cfg = EncoderConfig(
                layers=layers, max_length=512, token_budget=131072, max_batch=8192, compile=compiled
            )
            encoder = LayerEncoder(random_smollm2(), tokenizer, cfg, device)
            sync(device)
            start = time.perf_counter()
            first = encoder.encode(texts)  # warm-up: CUDA context, kernels, allocator, compilation
            sync(device)
            warmup = time.perf_counter() - start
            times, tokens = [], 0
            for _ in range(repeats):
                sync(device)
                got = encoder.encode(texts)
                sync(device)
                times.append(got.seconds)
                tokens = got.tokens
            if layers == (15,):  # compiled and eager agree (bf16): cosine of each text's two vectors
                if reference is None:
                    reference = got.vectors
                else:
                    cos = (reference * got.vectors).sum(-1).min()
                    print(f"compiled vs eager: min cosine {cos:.5f}", flush=True)
            label = f"encoder: packed, bf16, stop at {max(layers)}, layers {list(layers)}" + (
                ", compiled" if compiled else ""
            )
            results.append(
                row(name, label, texts, tokens, statistics.median(times)) | {"first_call_s": warmup}
            )
            print(results[-1], flush=True)
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
    print("\n| workload | variant | texts | texts/s | real tokens/s |\n|---|---|---|---|---|")
    for r in results:
        rates = f"{r['texts_per_s']:,.0f} | {r['tokens_per_s']:,.0f}"
        print(f"| {r['workload']} | {r['variant']} | {r['texts']:,} | {rates} |")
    if out:
        out.write_text(json.dumps({"device": str(device), "results": results}, indent=1))


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
    args = parser.parse_args()
    if args.make_texts:
        make_texts(args.make_texts, args.data_dir)
    else:
        run(args.texts, args.out, args.repeats)


if __name__ == "__main__":
    main()
