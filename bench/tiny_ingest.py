"""Wall and machine CPU time of repeated tiny ingests in one warm Spark session: the fixed cost a job pays per
run (reads, five great-expectations gates, MERGEs), which dominates small incremental runs and the test suite.

    .venv/bin/python bench/tiny_ingest.py [--runs 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import INTERACTIONS, ITEMS, USERS  # noqa: E402  (the suite's tiny CSVs)

from llmfeat.config import DeltaConf, load_settings  # noqa: E402
from llmfeat.session import build_session  # noqa: E402
from llmfeat.spark_jobs.ingest import run  # noqa: E402


def cpu_seconds() -> float:
    """Busy CPU time of the whole machine (user + nice + system): the JVM is not this process's child."""
    user, nice, system = (int(x) for x in Path("/proc/stat").read_text().split()[1:4])
    return (user + nice + system) / 100


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    spark = build_session(load_settings("tiny").spark, DeltaConf(backend="delta-spark"))
    for i in range(args.runs):
        root = Path(tempfile.mkdtemp())
        files = {"items": ITEMS, "users": USERS, "interactions": INTERACTIONS}
        for name, text in files.items():
            (root / f"{name}.csv").write_text(text)
        overrides = [f"ingest.files.{n}={root / n}.csv" for n in files]
        settings = load_settings("tiny", [f"data_dir={root / 'lake'}", "ingest.source=files", *overrides])
        cpu, start = cpu_seconds(), time.perf_counter()
        run(spark, settings)
        print(f"run {i}: wall {time.perf_counter() - start:.1f} s, machine CPU {cpu_seconds() - cpu:.1f} s")
    spark.stop()


if __name__ == "__main__":
    main()
