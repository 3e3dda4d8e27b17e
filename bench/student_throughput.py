"""Encode throughput of the SLMRec student against its teacher, with the executor-side encoder.

Random weights in SmolLM2-135M's exact shape (bench/encode_throughput.py): the teacher stops at its tapped
layer (15 of 30), the student is the first 8 blocks (its last layer, final norm applied). Same FLOPs as the
real checkpoints. Texts: the real ML-100k item and user texts written by `encode_throughput.py --make-texts`.

    python bench/encode_throughput.py --make-texts .bench        # here, once
    python bench/student_throughput.py --texts .bench --out $OUT/student.json   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_throughput import SMOLLM2_135M, EncoderConfig, LayerEncoder, sync  # noqa: E402


def random_model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})).eval()  # type: ignore[arg-type]


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--teacher-layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (encode.compile)")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.texts / "tokenizer")
    texts = {k: json.loads((args.texts / f"{k}.json").read_text()) for k in ("items", "users")}
    workloads = {"items": texts["items"] * 30, "users": texts["users"] * 10}
    encoders = {
        f"teacher (30 blocks, stop at {args.teacher_layer})": LayerEncoder(
            random_model(30), tokenizer, EncoderConfig(layers=(args.teacher_layer,), token_budget=131072,
                                                       max_batch=8192, compile=args.compile), device),
        f"student ({args.student_layers} blocks)": LayerEncoder(
            random_model(args.student_layers), tokenizer,
            EncoderConfig(layers=(args.student_layers,), token_budget=131072, max_batch=8192,
                          compile=args.compile), device),
    }  # fmt: skip
    results = []
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    for workload, batch in workloads.items():
        for name, enc in encoders.items():
            enc.encode(batch)  # warm-up (and compilation)
            times, tokens = [], 0
            for _ in range(args.repeats):
                sync(device)
                started = time.perf_counter()
                out = enc.encode(batch)
                sync(device)
                times.append(time.perf_counter() - started)
                tokens = out.tokens
            best = min(times)
            row = {"encoder": name, "compiled": args.compile, "workload": workload, "texts": len(batch),
                   "tokens": tokens, "seconds": best, "texts_per_s": len(batch) / best,
                   "tokens_per_s": tokens / best}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
