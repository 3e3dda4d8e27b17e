"""A class-data-sharing archive of the classes a Spark job's JVM loads, made once by the set-up. A driver JVM
that maps it starts without reading, verifying and laying out those classes again: a local session and one
small query take about 60% of the CPU time (docs/benchmarks.md, "The test suite on 2 cores"), which is most of
what a short job or test pays.

    python -m llmfeat.jvm_archive             # what `make setup` runs; a second run finds it and does nothing
    python -m llmfeat.jvm_archive --options   # the JVM flags that map it (spark-submit --driver-java-options)

The session (llmfeat/session.py) adds those flags to the driver it starts. The archive holds the installed
pyspark's classes for this Java build: a JVM that finds it missing or made by another build starts as before
(-Xshare:auto), silently.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# What the archive's JVM runs: a local session with the delta-spark jars the set-up resolved, then what jobs
# do (Delta write, MERGE, read, Arrow both ways, a Python UDF stage), so that their classes are in it.
WORKLOAD = """
import sys
from pathlib import Path
import pandas as pd
from llmfeat.config import DeltaConf, load_settings
from llmfeat.delta_io import SparkDelta
from llmfeat.session import build_session
spark = build_session(load_settings("tiny").spark, DeltaConf(backend="delta-spark"))
tables = SparkDelta(Path(sys.argv[1]), spark)
frame = spark.createDataFrame(pd.DataFrame({"k": ["a", "b"], "v": [1.0, 2.0]}))
tables.write("t", frame)
changed = frame.mapInPandas(lambda parts: (p.assign(v=p.v + 1) for p in parts), frame.schema)
tables.upsert("t", changed, keys=["k"])
tables.read_spark("t").groupBy("k").count().toPandas()
spark.stop()
"""


def archive_path() -> Path:
    """Beside the environment's packages, named by the pyspark whose classes it holds."""
    spark = importlib.metadata.version("pyspark")
    return Path(sys.prefix) / "share" / "llmfeat" / "jvm" / f"spark-{spark}.jsa"


def java_options() -> str:
    """The JVM flags that map the archive, or "" when the set-up has not made one."""
    path = archive_path()
    if not path.exists():
        return ""
    return f"-XX:SharedArchiveFile={path} -Xshare:auto -Xlog:cds=off -Xlog:cds+dynamic=off"


def make_archive() -> Path:
    """Run the workload in a JVM that writes its loaded classes at exit; the archive appears whole or not."""
    path = archive_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        partial = path.with_suffix(".partial")
        env = {**os.environ, "SPARK_SUBMIT_OPTS": f"-XX:ArchiveClassesAtExit={partial} -Xlog:cds=off"}
        cmd = [sys.executable, "-c", WORKLOAD, scratch]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"the JVM class archive was not made:\n{done.stderr[-3000:]}")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", action="store_true", help="print the JVM flags that map the archive")
    args = parser.parse_args(argv)
    if args.options:
        print(java_options())
        return 0
    path = archive_path()
    if path.exists():
        print(f"JVM class archive: {path} (made before)")
        return 0
    try:
        made = make_archive()
    except RuntimeError as err:  # only start-up time is lost: the JVMs start as they would without it
        print(f"JVM class archive: not made, JVMs start without it ({err})", file=sys.stderr)
        return 0
    print(f"JVM class archive: {made} ({made.stat().st_size >> 20} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
