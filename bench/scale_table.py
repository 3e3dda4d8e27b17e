"""The scale section's tables of docs/benchmarks.md, from the runs bench/scale.py recorded.

.venv/bin/python bench/scale_table.py docs/scale_results.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("ingest", "encode", "train", "compress", "publish", "state", "feast", "training_set", "ctr")
MIB = 2**20
Run = dict[str, Any]


def backend_tables(runs: dict[tuple[int, str], Run], backend: str) -> str:
    """Time and rows, the driver's peak (with 50x / 10x) and the JVM's peak of one backend's runs."""
    scales = sorted({s for s, _ in runs})
    stages = [s for s in STAGES if any((x, s) in runs for x in scales)]
    head = "| scale | " + " | ".join(stages) + " |\n|---|" + "---:|" * len(stages) + "\n"

    def table(title: str, cell: Callable[[Run], str], ratio: bool = False) -> str:
        lines = [f"**{backend}**: {title}\n\n", head]
        for scale in scales:
            found = [runs.get((scale, s)) for s in stages]
            lines.append(f"| {scale}x | " + " | ".join("-" if r is None else cell(r) for r in found) + " |\n")
        if ratio and {10, 50} <= set(scales):
            pairs = [(runs.get((50, s)), runs.get((10, s))) for s in stages]
            cells = [
                "-"
                if a is None or b is None
                else f"**{a['driver_peak_bytes'] / b['driver_peak_bytes']:.2f}**"
                for a, b in pairs
            ]
            lines.append("| 50x / 10x | " + " | ".join(cells) + " |\n")
        return "".join(lines) + "\n"

    return (
        table("wall time of the job (s) / rows", lambda r: f"{r['seconds']:.1f} / {r['rows']:,}")
        + table("the driver's peak RSS (MiB)", lambda r: f"{r['driver_peak_bytes'] / MIB:,.0f}", ratio=True)
        + table(
            "the JVM's peak RSS (MiB; local mode: also the executors)",
            lambda r: f"{r['jvm_peak_bytes'] / MIB:,.0f}",
        )
    )


def tables(results: dict[str, Any]) -> str:
    backends = sorted({r["backend"] for r in results["runs"]})
    return "".join(
        backend_tables({(r["scale"], r["stage"]): r for r in results["runs"] if r["backend"] == b}, b)
        for b in backends
    )


if __name__ == "__main__":
    print(tables(json.loads(Path(sys.argv[1]).read_text())))
