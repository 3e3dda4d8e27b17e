"""What a user of the published package gets: one wheel, installed in a fresh venv, run outside the checkout.

One fresh venv serves the whole module (PyTorch alone is a few GB; pip's cache makes a second install cheap):
it starts with only mlflow, torch and pandas, the environment of a serving system that loads a registered
model, and the wheel is installed into it last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "clean-venv"
BIN = VENV / "bin"


def pip(*args: str) -> None:
    cmd = [str(BIN / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *args]
    subprocess.run(cmd, check=True, timeout=1500)


@pytest.fixture(scope="module")
def clean_venv() -> Path:
    """A fresh venv with mlflow, torch and pandas only (torch first: the pinned build)."""
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip("torch==2.13.0")
    pip("mlflow", "pandas")
    return VENV


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, timeout=600)
    return next(out.glob("llmfeat-*.whl"))


def test_wheel_holds_one_import_name_and_its_files(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"llmfeat"}
    for shipped in ("llmfeat/conf/local.yaml", "llmfeat/feature_repo/feature_views.py", "llmfeat/py.typed"):
        assert shipped in names
    assert "llmfeat/models/marc/model.py" in names and "llmfeat/spark_jobs/ingest.py" in names


def test_installed_wheel_ingests_from_another_folder(clean_venv: Path, wheel: Path, tmp_path: Path) -> None:
    pip(str(wheel))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(BIN / "llmfeat"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and "ingest" in out.stdout
    # Without the data package: one line that says how to install it.
    cmd = [str(BIN / "llmfeat"), "ingest", "--set", "data_dir=lake", "--set", "spark.master=local[1]"]
    missing = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1
    assert "pip install --no-deps recbole==1.2.1" in missing.stderr
    subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "-q", "--no-deps", "recbole==1.2.1"], check=True
    )
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interactions" in done.stdout and "100,000" in done.stdout
    assert (tmp_path / "lake" / "delta" / "interactions" / "_delta_log").is_dir()
    site = subprocess.run(
        [str(BIN / "python"), "-c", "import llmfeat, os; print(os.path.dirname(llmfeat.__file__))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert "site-packages" in site
    assert not any(p.suffix == ".db" for p in Path(site).rglob("*")), "nothing is written into site-packages"
