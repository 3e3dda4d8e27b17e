"""`import mlflow` is the installed library in every way the project runs Python, never the mlflow/ folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).with_name("spark-submit")
PROBE = """
import mlflow
from pyspark.sql import SparkSession

spark = SparkSession.builder.master("local[1]").config("spark.driver.host", "127.0.0.1").getOrCreate()
worker = spark.sparkContext.parallelize([0], 1).map(lambda _: __import__("mlflow").__file__).collect()[0]
print("driver", mlflow.__file__)
print("worker", worker)
"""


def _is_library(path: str) -> bool:
    return "site-packages" in path and not path.startswith(str(REPO_ROOT / "mlflow"))


def _env() -> dict[str, str]:
    # The worst case: the repo root first on every path, as when running from a checkout.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": str(REPO_ROOT),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


@pytest.mark.unit
def test_pytest_imports_the_library() -> None:
    import mlflow

    assert _is_library(mlflow.__file__ or "") and hasattr(mlflow, "start_run")
    assert not (REPO_ROOT / "mlflow" / "__init__.py").exists()


@pytest.mark.unit
def test_python_dash_m_imports_the_library() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmfeat.cli", "env"],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("mlflow "))
    assert _is_library(line.split()[-1]), line


@pytest.mark.spark
def test_spark_python_workers_import_the_library(spark) -> None:
    paths = spark.sparkContext.parallelize(range(2), 2).map(lambda _: __import__("mlflow").__file__).collect()
    assert all(_is_library(p) for p in paths), paths


@pytest.mark.integration
def test_spark_submit_driver_and_workers_import_the_library(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = subprocess.run(
        [str(SPARK_SUBMIT), str(probe)],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines() if ln.startswith(("driver", "worker")))
    assert _is_library(lines["driver"]) and _is_library(lines["worker"]), lines
