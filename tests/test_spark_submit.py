"""The ingest job as a user runs it: spark-submit --master ... spark_jobs/ingest.py --config ..."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmfeat.delta_io import RustDelta

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_spark_submit_ingest_writes_tables_and_reruns_cleanly(tmp_path, source_dir) -> None:
    lake = tmp_path / "lake"
    cmd = [
        str(Path(sys.executable).with_name("spark-submit")),
        "--master",
        "local[1]",  # the tiny profile says local[2]: spark-submit's flag wins
        "spark_jobs/ingest.py",
        "--config",
        "conf/tiny.yaml",
        "--set",
        f"data_dir={lake}",
        "--set",
        "ingest.source=files",
    ]
    cmd += [f"--set=ingest.files.{k}={source_dir / (k + '.csv')}" for k in ("interactions", "items", "users")]
    # As after `source .venv/bin/activate`: spark-submit finds pyspark through the venv's python3.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr  # spark-submit relays the driver's stderr on its stdout
    assert "ingest: Spark master local[1] (client mode), application local-" in said
    assert "interactions" in out.stdout and str(lake / "delta" / "interactions") in out.stdout
    assert RustDelta(lake / "delta").read_arrow("interactions").num_rows == 10

    (source_dir / "users.csv").write_text("user_id,age\n10,x\n10,y\n")
    bad = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    said = bad.stdout + bad.stderr  # spark-submit may relay the driver's stderr on its stdout
    assert "users.csv: column 'user_id': duplicate id" in said
    assert "Traceback" not in said
    assert RustDelta(lake / "delta").version("users") == 0
