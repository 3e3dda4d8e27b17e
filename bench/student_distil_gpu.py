"""SLMRec on a GPU machine without the lake or MLflow: distil the student (`distil_student.run`), then encode
the items with teacher and student and time both encoders on the same machine, in the same run.

    # here: the distillation texts, item and user texts (from the lake) and the teacher's GGUF
    python bench/student_distil_gpu.py --make-inputs .slm --set data_dir=data/local
    # on the GPU machine (PYTHONPATH holds the llmfeat package)
    python bench/student_distil_gpu.py --inputs .slm --gguf .slm/teacher.gguf --out $OUT [--set key=value]

Writes to --out: distil_<pooling>.json (the student's slmrec.json record and the loss curve, one per
`--poolings`), item_vectors.npz (float16: teacher layers 8 and 15 and each student's last layer, as the encode
job publishes them: `encode.pooling`, `encode.normalize`) and throughput.json (teacher stopping at its tapped
layer against the student, item and user texts, best of 3 after a warm-up). The student folders stay on the
GPU machine (227 MB each); `spark_jobs/eval_student.probe_table` judges the vectors where the lake is.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_inputs(out: Path, overrides: list[str]) -> None:
    from llmfeat.config import load_settings
    from llmfeat.delta_io import RustDelta
    from llmfeat.models.encoder import packaged_gguf
    from llmfeat.spark_jobs.distil_student import distillation_texts
    from llmfeat.spark_jobs.eval_student import workload_texts

    settings = load_settings("local", overrides)
    out.mkdir(parents=True, exist_ok=True)
    items = RustDelta(settings.delta_root).read_arrow("items")
    n_users = RustDelta(settings.delta_root).read_arrow("users").num_rows
    work = workload_texts(settings, n_items=items.num_rows, n_users=n_users)
    inputs = {
        "distil": distillation_texts(settings),
        "item_keys": items["item_id"].to_pylist(),
        "item_texts": items["text"].to_pylist(),  # in the items table's order
        "user_texts": work["users"],
    }
    (out / "inputs.pkl").write_bytes(pickle.dumps(inputs))
    gguf = packaged_gguf(settings.slmrec.teacher)
    (out / "teacher.gguf").write_bytes(gguf.read_bytes())


def timed(enc: object, texts: list[str], repeats: int = 3) -> dict[str, float]:
    enc.encode(texts)  # type: ignore[attr-defined]  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = enc.encode(texts)  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        best, tokens = min(best, time.perf_counter() - started), out.tokens
    return {"texts": len(texts), "tokens": tokens, "seconds": best, "texts_per_s": len(texts) / best,
            "tokens_per_s": tokens / best}  # fmt: skip


def encode_items(args: Any, inputs: dict[str, Any], teacher: Any, students: dict[str, Path], encoder: Any,
                 n: int, m: int) -> None:  # fmt: skip
    """Item vectors as the encode job publishes them: teacher layers n and m, each student's layer n."""
    from llmfeat.models.encoder import resolve_model

    both = encoder(teacher, (n, m)).encode(inputs["item_texts"]).vectors  # (I, 2, H)
    vectors = {f"teacher_{n}": both[:, 0], f"teacher_{m}": both[:, 1]}
    for pooling, folder in students.items():
        vectors[f"student_{pooling}"] = encoder(resolve_model(str(folder), "unused"), (n,)).encode(
            inputs["item_texts"]).vectors[:, 0]  # fmt: skip
    np.savez_compressed(args.out / "item_vectors.npz", item_keys=np.array(inputs["item_keys"]),
                        **{k: v.astype(np.float16) for k, v in vectors.items()})  # fmt: skip


def on_gpu(args: argparse.Namespace) -> None:
    from llmfeat.config import load_settings
    from llmfeat.models.encoder import EncoderConfig, load_encoder, resolve_model
    from llmfeat.spark_jobs import distil_student

    distil_student.log_run = lambda *a, **k: "not logged (GPU machine without MLflow)"  # type: ignore[assignment]
    inputs = pickle.loads((args.inputs / "inputs.pkl").read_bytes())
    work = Path("/tmp/slmrec")
    base = [f"data_dir={work}", f"slmrec.teacher={args.gguf.resolve()}", f"encode.cache_dir={work}/models"]
    settings = load_settings("local", base + args.set)
    device = torch.device("cuda")
    students = {
        p.parent.name.removeprefix("students-"): p for p in sorted(work.glob("students-*/*-slmrec-*"))
    }
    for pooling in [] if args.throughput_only else args.poolings.split(","):
        s = load_settings("local", [*base, *args.set, f"slmrec.pooling={pooling}",
                                    f"slmrec.output_dir=students-{pooling}"])  # fmt: skip
        summary = distil_student.run(None, s, inputs["distil"])
        print(summary, flush=True)
        record = json.loads((Path(summary.folder) / "slmrec.json").read_text())
        record["losses"] = summary.losses
        (args.out / f"distil_{pooling}.json").write_text(json.dumps(record, indent=1, default=str))
        students[pooling] = Path(summary.folder)

    e, cfg = settings.encode, settings.slmrec
    n = cfg.student_layers

    def encoder(source: object, layers: tuple[int, ...]) -> object:
        conf = EncoderConfig(layers=layers, pooling=e.pooling, normalize=e.normalize, max_length=e.max_length,
                             token_budget=131072, max_batch=8192, cuda_graphs=False)  # fmt: skip
        return load_encoder(source, conf, device)  # type: ignore[arg-type]

    teacher = resolve_model(str(args.gguf.resolve()), f"{work}/models")
    if not args.throughput_only:
        encode_items(args, inputs, teacher, students, encoder, cfg.student_layers, cfg.teacher_layer)

    # Throughput, same machine, same run: the teacher stops at its tapped layer, the student at its last.
    first = next(iter(students.values()))
    encoders = {f"teacher (stop at {cfg.teacher_layer})": encoder(teacher, (cfg.teacher_layer,)),
                f"student ({n} blocks)": encoder(resolve_model(str(first), "unused"), (n,))}  # fmt: skip
    workloads = {"items": inputs["item_texts"] * 30, "users": inputs["user_texts"] * 10}
    rows = []
    for workload, texts in workloads.items():
        for name, enc in encoders.items():
            rows.append({"encoder": name, "workload": workload, **timed(enc, texts)})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "throughput.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                          "results": rows}, indent=1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-inputs", type=Path, default=None)
    parser.add_argument("--inputs", type=Path, default=None)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--poolings", default="last,mean")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--throughput-only", action="store_true", help="students already in /tmp/slmrec")
    args = parser.parse_args()
    if args.make_inputs:
        make_inputs(args.make_inputs, args.set)
    else:
        on_gpu(args)


if __name__ == "__main__":
    main()
