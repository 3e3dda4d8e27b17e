"""Peak memory of a delta-rs MERGE against the size of its target table.

The embedded backend MERGEs in the driver's process (DataFusion inside delta-rs). It measures the peak RSS of
one MERGE of a small source (keys spread over every file of the target: the worst case, every file rewritten)
into targets of growing size. Each measurement runs in a fresh process; the peak is the process's VmHWM.

    .venv/bin/python bench/delta_rs_merge_memory.py --rows 1000000 4000000 12000000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM = 64


def target_batches(rows: int, batch: int = 200_000):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * DIM, dtype="float32")), DIM)
        yield pa.record_batch(
            {
                "user_id": pa.array(range(start, start + n), pa.int64()),
                "vector": pa.ListArray.from_arrays(
                    pa.array(range(0, (n + 1) * DIM, DIM), pa.int32()), vec.flatten()
                ),
            }
        )


def build(path: str, rows: int) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    batches = target_batches(rows)
    first = next(batches)
    reader = pa.RecordBatchReader.from_batches(first.schema, [first, *batches])
    write_deltalake(path, reader, mode="overwrite")


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM, which unlike ru_maxrss a fork does not inherit)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def merge_once(path: str, rows: int, source_rows: int) -> dict:
    """One MERGE in this process: its time and this process's peak RSS before and after it."""
    import numpy as np
    import pyarrow as pa

    from llmfeat.delta_io import RustDelta

    keys = np.linspace(0, rows - 1, source_rows).astype("int64")  # spread over every file
    vec = np.ones((source_rows, DIM), "float32")
    source = pa.table({"user_id": keys, "vector": pa.array(list(vec), pa.list_(pa.float32()))})
    root, name = str(Path(path).parent), Path(path).name
    before = peak_rss_mb()
    start = time.perf_counter()
    RustDelta(root).upsert(name, source, ["user_id"])
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "rss_before_merge_mb": before, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--source-rows", type=int, default=10_000)
    ap.add_argument("--out", default="docs/delta_rs_merge_memory.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # path rows source_rows
        path, rows, src = args.child
        print(json.dumps(merge_once(path, int(rows), int(src))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = f"{tmp}/t{rows}"
            build(path, rows)
            files = list(Path(path).glob("*.parquet"))
            out = subprocess.run(
                [sys.executable, __file__, "--child", path, str(rows), str(args.source_rows)],
                check=True,
                capture_output=True,
                text=True,
            )
            row = {
                "target_rows": rows,
                "target_files": len(files),
                "target_mb_on_disk": round(sum(f.stat().st_size for f in files) / 2**20),
                "source_rows": args.source_rows,
                **json.loads(out.stdout.strip().splitlines()[-1]),
            }
            print(row, flush=True)
            results.append(row)
            shutil.rmtree(path)
    Path(args.out).write_text(
        json.dumps(
            {"machine": platform.node(), "cpus": __import__("os").cpu_count(), "results": results}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
