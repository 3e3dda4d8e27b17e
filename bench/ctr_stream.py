"""Peak memory of CTR training over a streamed training set against the size of the set (ctr.stream).

Writes a synthetic training set (the columns train-ctr reads: ids, time, split, label, year, genres, the four
counters, a user and an item vector of --dim floats, 64 as MARC's) as Parquet files of --file-rows rows, at
each size of --rows, and trains the DNN with LLM vectors (id stage, then the residual branch; one epoch each,
the config's defaults otherwise) in a fresh process per run:
- stream: models/ctr/stream_train.py over the files (ctr.stream_buffer_rows, ctr.stream_batch_rows);
- memory (with --in-memory): the files read into one frame and models/ctr/train.py `fit_model`, as train-ctr
  does without the stream.
Per run: the process's peak RSS (VmHWM) before and after training, the peak of Python allocations during
training (tracemalloc: Python objects and numpy arrays; torch's and Arrow's own allocators are not traced),
Arrow's pool peak, and the time.

    .venv/bin/python bench/ctr_stream.py --rows 100000 1000000 --in-memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

DAY_US = 86_400_000_000
T0_US = 1_700_000_000_000_000


def synthetic_batches(rows: int, dim: int, batch: int) -> Iterator[pa.RecordBatch]:
    """The set in time order, `batch` rows at a time; labels follow the user and item vectors' dot product
    and an item bias; 70/15/15 time splits."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    n_users, n_items = max(100, rows // 40), max(50, rows // 200)
    user_vec = rng.standard_normal((n_users, dim)).astype(np.float32)
    item_vec = rng.standard_normal((n_items, dim)).astype(np.float32)
    item_bias = rng.standard_normal(n_items)
    step = 60 * DAY_US // rows
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        pos = np.arange(start, start + n)
        user, item = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
        logit = (user_vec[user] * item_vec[item]).sum(axis=1) / np.sqrt(dim) + item_bias[item] - 0.5
        split = np.where(pos < 0.7 * rows, "train", np.where(pos < 0.85 * rows, "valid", "test"))

        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        user_vectors = pa.ListArray.from_arrays(offsets, pa.array(user_vec[user].ravel()))
        item_vectors = pa.ListArray.from_arrays(offsets, pa.array(item_vec[item].ravel()))
        yield pa.record_batch(
            {
                "user_id": pa.array([f"u{u}" for u in user]),
                "item_id": pa.array([f"i{i}" for i in item]),
                "event_timestamp": pa.array(T0_US + pos * step, pa.timestamp("us", tz="UTC")),
                "label": pa.array((rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)),
                "split": pa.array(split),
                "year": pa.array(rng.integers(1950, 2000, n).astype(float)),
                "genres": pa.array(np.array(["Drama", "Comedy|Drama", "Action"])[item % 3]),
                "user_impressions": pa.array(rng.integers(0, 50, n).astype(float)),
                "user_clicks": pa.array(rng.integers(0, 10, n).astype(float)),
                "item_impressions": pa.array(rng.integers(0, 500, n).astype(float)),
                "item_clicks": pa.array(rng.integers(0, 100, n).astype(float)),
                "user_vector": user_vectors,
                "item_vector": item_vectors,
            }
        )


def write_set(folder: Path, rows: int, dim: int, file_rows: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    paths = []
    for number, batch in enumerate(synthetic_batches(rows, dim, file_rows)):
        path = folder / f"part-{number:05d}.parquet"
        pq.write_table(pa.Table.from_batches([batch]), path)  # one row group a file: read through a buffer
        paths.append(str(path))
    return paths


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM, which unlike ru_maxrss a fork does not inherit)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def train_once(folder: str, mode: str) -> dict[str, object]:
    """One training in this process; its memory and time."""
    import tracemalloc

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from llmfeat.config import CtrConf, MarcConf
    from llmfeat.models.ctr.roles import ROLE_COLUMNS, row_roles
    from llmfeat.models.ctr.stream import scan_files
    from llmfeat.models.ctr.stream_train import StreamSource, fit_model_stream
    from llmfeat.models.ctr.train import fit_model

    torch.set_num_threads(2)
    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    cfg = CtrConf(max_epochs=1, stream=True)
    marc = MarcConf()
    before = peak_rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    roles = row_roles(
        lambda: scan_files(files, ROLE_COLUMNS, cfg.stream_batch_rows),
        cfg.stop_frac,
        marc.fit_frac + marc.stop_frac,
    )
    held = {}
    if mode == "stream":
        source = StreamSource(tuple(files), roles, cfg.stream_buffer_rows, cfg.stream_batch_rows)
        fit_model_stream(source, True, cfg, lambda metrics, _step: held.update(metrics))
    else:
        frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        table = pa.Table.from_pandas(frame[list(ROLE_COLUMNS)])
        masks = {r: roles.mask(table, r) for r in ("fit", "valid", "test", "train")}
        fit_model(frame, masks, True, cfg, residual_rows=np.flatnonzero(roles.mask(table, "residual")))
    seconds = time.perf_counter() - start
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "seconds": round(seconds, 1),
        "rss_before_training_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "python_peak_mb": round(traced / 2**20),
        "arrow_pool_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20),
        **{k: int(v) for k, v in held.items() if k.endswith("stream_peak_rows")},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--file-rows", type=int, default=50_000)
    ap.add_argument("--in-memory", action="store_true", help="also the in-memory trainer, for contrast")
    ap.add_argument("--out", default="docs/ctr_stream_memory.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # folder mode
        print(json.dumps(train_once(*args.child)))
        return
    modes = ["stream", "memory"] if args.in_memory else ["stream"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            folder = Path(tmp) / f"set{rows}"
            files = write_set(folder, rows, args.dim, args.file_rows)
            on_disk = round(sum(Path(f).stat().st_size for f in files) / 2**20)
            for mode in modes:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(folder), mode],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row = {"rows": rows, "files": len(files), "parquet_mb": on_disk, "mode": mode}
                row |= json.loads(out.stdout.strip().splitlines()[-1])
                print(row, flush=True)
                results.append(row)
    command = "bench/ctr_stream.py " + " ".join(sys.argv[1:])
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "command": command, "dim": args.dim}
    Path(args.out).write_text(json.dumps(machine | {"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
