"""What a user of the published package gets: one wheel, installed in a fresh venv, run outside the checkout.

One fresh venv serves the whole module: it starts with only mlflow, torch and pandas, the environment of a
serving system that loads a registered model (the tests that load models come first), and the wheel is
installed into it last. uv installs it, resolving against the index as pip does, with the same constraints:
PyTorch's wheels alone are a few GB, which uv links from its cache where pip would unpack them again
(2 s instead of about 130 s once the cache is warm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import source_overrides

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "clean-venv"
BIN = VENV / "bin"


UV = Path(sys.executable).parent / "uv"  # the set-up installs it into the project's venv (the dev extra)


def pip(*args: str) -> None:
    """`pip install` into the clean venv, through uv."""
    cmd = [str(UV), "pip", "install", "-q", "--python", str(BIN / "python")]
    cmd += ["-c", str(ROOT / "constraints.txt"), *built_wheels(), *args]
    subprocess.run(cmd, check=True, timeout=1500)


def built_wheels() -> list[str]:
    """--find-links to the wheels pip built for the set-up from packages that ship only as sources (pyspark,
    300 MB of jars): uv would build them again for each venv."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "--format=abspath"], capture_output=True, text=True
    ).stdout
    folders = sorted({str(Path(line).parent) for line in out.splitlines() if line.endswith(".whl")})
    return [arg for folder in folders for arg in ("--find-links", folder)]


@pytest.fixture(scope="module")
def clean_venv() -> Path:
    """A fresh venv with mlflow, torch and pandas only (torch pinned as the set-up pins it)."""
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(VENV)], check=True)
    pip("torch==2.13.0", "mlflow", "pandas")
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


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite store holding tiny CTR rankers of both families (llmfeat-ctr@champion, a DNN;
    llmfeat-ctr-tree@champion, LightGBM) and a tiny MARC compressor (test-marc-users@champion), trained and
    logged here, in the project's venv; yields its URI."""
    import mlflow

    from llmfeat.config import load_settings
    from llmfeat.models.ctr.pyfunc import dnn_ranker, log_ranker, tree_ranker
    from llmfeat.models.ctr.train import fit_model
    from llmfeat.models.ctr.tree import fit_tree
    from llmfeat.models.marc.model import MarcCompressor
    from llmfeat.registry import log_and_register, tracking_uri, use_tracking
    from llmfeat.reprs import COMPRESSOR_LINEAGE

    data = tmp_path_factory.mktemp("registry")
    settings = load_settings(
        "tiny", [f"data_dir={data}", "ctr.max_epochs=2", "ctr.hidden=[8]", "marc.registry_name=test-marc"]
    )
    with pytest.MonkeyPatch.context() as env:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            env.delenv(name)
        use_tracking(settings, settings.marc.experiment)
        frame, masks = tiny_ctr_frame()
        model, encoder = fit_model(frame, masks, True, settings.ctr)
        tree = settings.ctr.model_copy(update={"kind": "lightgbm", "tree_min_leaf": 5})
        with mlflow.start_run():
            example = frame[masks["test"]].head(5)
            info = log_ranker(dnn_ranker(model, encoder), example, "llmfeat-ctr")
            tree_info = log_ranker(
                tree_ranker(*fit_tree(frame, masks, True, tree)), example, "llmfeat-ctr-tree"
            )
            compressor = MarcCompressor(in_dim=8, out_dim=3, hidden_dim=4)
            lineage = {
                k: "8" if k == "in_dim" else "3" if k == "out_dim" else "x" for k in COMPRESSOR_LINEAGE
            }
            log_and_register(compressor, settings, "users", lineage)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias("llmfeat-ctr", "champion", info.registered_model_version)
        client.set_registered_model_alias("llmfeat-ctr-tree", "champion", tree_info.registered_model_version)
        yield tracking_uri(settings)


def tiny_ctr_frame(n: int = 240, dim: int = 8) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A scoring frame with LLM vectors (models/ctr/features.py) and train / valid / test masks."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, 20, n).astype(str),
            "item_id": rng.integers(0, 15, n).astype(str),
            "year": rng.choice([1990.0, 2000.0, np.nan], n),
            "genres": rng.choice(np.array(["Action|Comedy", "Drama", None], dtype=object), n),
            "user_vector": [rng.normal(size=dim).tolist() for _ in range(n)],
            "item_vector": [rng.normal(size=dim).tolist() for _ in range(n)],
            "label": rng.integers(0, 2, n),
        }
    )
    for who in ("user", "item"):  # impressions and clicks before the event, as the training set carries them
        frame[f"{who}_impressions"] = rng.integers(0, 30, n).astype(float)
        frame[f"{who}_clicks"] = np.floor(frame[f"{who}_impressions"] * rng.uniform(0, 1, n))
    row = np.arange(n)
    train = row < 0.7 * n
    masks = {"fit": train, "train": train, "valid": ~train & (row < 0.85 * n), "test": row >= 0.85 * n}
    return frame, masks


LOAD_AND_PREDICT = """
import importlib.util, json, sys
import mlflow
assert importlib.util.find_spec("llmfeat") is None, "llmfeat is installed in this venv"
out = {}
for uri in ("models:/llmfeat-ctr@champion", "models:/test-marc-users@champion"):
    model = mlflow.pyfunc.load_model(uri)
    p = model.predict(model.input_example)
    out[uri] = {"rows": len(p), "finite": bool((abs(p) < float("inf")).all())}
    out[uri]["requirements"] = open(mlflow.pyfunc.get_model_dependencies(uri)).read()
out["llmfeat"] = sys.modules["llmfeat"].__file__
print(json.dumps(out))
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "PYTHONPATH"}
    return {**env, "PATH": f"{BIN}:{os.environ['PATH']}"}


def test_registered_models_load_and_predict_with_only_mlflow_torch_pandas(
    clean_venv: Path, registry: str, tmp_path: Path
) -> None:
    env = {**clean_env(), "MLFLOW_TRACKING_URI": registry}
    cmd = [str(BIN / "python"), "-c", LOAD_AND_PREDICT]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    ranker, compressor = out["models:/llmfeat-ctr@champion"], out["models:/test-marc-users@champion"]
    assert ranker["rows"] == 5 and ranker["finite"] and compressor["rows"] == 2 and compressor["finite"]
    for model in (ranker, compressor):
        assert "llmfeat" not in model["requirements"] and "torch==" in model["requirements"]
    assert "/code/llmfeat/" in out["llmfeat"]  # the code the ranker carries


def test_a_tree_ranker_loads_and_predicts_after_installing_its_own_requirements(
    clean_venv: Path, registry: str, tmp_path: Path
) -> None:
    """The venv gets what the tree's MLmodel records (lightgbm beside mlflow, torch and pandas), nothing
    from the project."""
    env = {**clean_env(), "MLFLOW_TRACKING_URI": registry}
    find = "import mlflow; print(mlflow.pyfunc.get_model_dependencies('models:/llmfeat-ctr-tree@champion'))"
    done = subprocess.run(
        [str(BIN / "python"), "-c", find], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    requirements = Path(done.stdout.strip().splitlines()[-1])
    assert "lightgbm==" in requirements.read_text() and "llmfeat" not in requirements.read_text()
    pip("-r", str(requirements))
    script = LOAD_AND_PREDICT.replace('"models:/llmfeat-ctr@champion", "models:/test-marc-users@champion"',
                                      '"models:/llmfeat-ctr-tree@champion",')  # fmt: skip
    done = subprocess.run([str(BIN / "python"), "-c", script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    tree = json.loads(done.stdout.strip().splitlines()[-1])["models:/llmfeat-ctr-tree@champion"]
    assert tree["rows"] == 5 and tree["finite"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mlflow_models_serve_answers_with_the_champion(
    clean_venv: Path, registry: str, tmp_path: Path
) -> None:
    import mlflow

    example = (
        Path(
            mlflow.artifacts.download_artifacts(
                "models:/llmfeat-ctr@champion", dst_path=str(tmp_path / "model"), tracking_uri=registry
            )
        )
        / "serving_input_example.json"
    )
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/llmfeat-ctr@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {**clean_env(), "MLFLOW_TRACKING_URI": registry}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                alive = server.poll() is None and time.monotonic() < deadline
                assert alive, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(
            f"{url}/invocations", data=example.read_bytes(), headers={"Content-Type": "application/json"}
        )
        answer = json.load(urllib.request.urlopen(request, timeout=60))
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow and the uvicorn it started
        server.wait(timeout=30)
    scores = answer["predictions"]
    assert len(scores) == 5 and all(0 < p < 1 for p in scores)


def test_installed_wheel_ingests_from_another_folder(
    clean_venv: Path, wheel: Path, source_dir: Path, tmp_path: Path
) -> None:
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
    # The user's own files (the tiny CSVs; ML-100k from the data package is tests/test_ingest.py's)
    cmd += [a for override in source_overrides(source_dir) for a in ("--set", override)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^interactions\s+10\s", done.stdout, re.MULTILINE), done.stdout
    assert (tmp_path / "lake" / "delta" / "interactions" / "_delta_log").is_dir()
    site = subprocess.run(
        [str(BIN / "python"), "-c", "import llmfeat, os; print(os.path.dirname(llmfeat.__file__))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert "site-packages" in site
    assert not any(p.suffix == ".db" for p in Path(site).rglob("*")), "nothing is written into site-packages"
