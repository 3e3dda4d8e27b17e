"""Every entry point of the MLflow Project (mlflow/MLproject) under `mlflow run --env-manager local`, on tiny
data and a SQLite store in tmp_path: each job logs into the run `mlflow run` opened (MLFLOW_RUN_ID), in the
experiment that run lives in, and finds the registered models through MLFLOW_TRACKING_URI.

Each lake is written by the same helpers the job's own tests use; its settings travel as a YAML file
(`-P config=PATH`), the way a user passes their own profile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from test_compress import tiny_settings, write_inputs
from test_encoder import make_tiny_model_dir
from test_lite import tiny_lake
from test_slmrec import tiny_slm_settings

from llmfeat.config import Settings, load_settings
from llmfeat.delta_io import RustDelta
from llmfeat.spark_jobs.ingest import run as ingest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def config_file(settings: Settings, folder: Path) -> Path:
    """The settings as a profile file: what `-P config=PATH` reads."""
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


class Project:
    """`mlflow run mlflow -e ENTRY` against one SQLite store; each entry point in its own experiment."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)

    def run(self, entry: str, config: Path, **params: str) -> tuple[mlflow.entities.Run, str]:
        """Run ENTRY; returns the run `mlflow run` opened (as the job left it) and the job's stdout."""
        cmd = [str(BIN / "mlflow"), "run", "mlflow", "-e", entry, "--env-manager", "local"]
        cmd += ["--experiment-name", f"project-{entry}", "-P", f"config={config}"]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "PYTHONPATH"}
        env |= {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": self.store}
        env |= {"SPARK_LOCAL_IP": "127.0.0.1"}
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"mlflow run -e {entry}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        exp = self.client.get_experiment_by_name(f"project-{entry}")
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry}'"
        )
        assert len(runs) >= 1 and runs[0].info.status == "FINISHED", runs
        return runs[0], done.stdout

    def children(self, parent: mlflow.entities.Run) -> list[mlflow.entities.Run]:
        query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        return self.client.search_runs([parent.info.experiment_id], filter_string=query)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_train_compressor_and_compress(project: Project, tmp_path: Path) -> None:
    write_inputs(tmp_path / "marc" / "delta")
    config = config_file(tiny_settings(tmp_path / "marc"), tmp_path)
    trained, _ = project.run("train_compressor", config, layer="4", out_dim="3", max_epochs="2")
    assert trained.data.params["marc.layer"] == "4" and trained.data.tags["kind"] == "marc-compressor"
    items = project.client.get_model_version_by_alias("test-marc-items", "champion")
    assert items.run_id == trained.info.run_id

    _, out = project.run("compress", config, entity="items")
    assert "item_marc_v1_features" in out
    assert RustDelta(tmp_path / "marc" / "delta").read_arrow("item_marc_v1_features").num_rows > 0


def test_train_lite_logs_one_child_run_per_model(project: Project, tmp_path: Path) -> None:
    tiny_lake(tmp_path / "lite")
    lite = load_settings(
        "tiny", [f"data_dir={tmp_path / 'lite'}", "lite.max_epochs=2", "lite.seeds=[0]", "lite.k=3"]
    )
    parent, _ = project.run("train_lite", config_file(lite, tmp_path), layer="2")
    assert "next-item-lite" in {r.data.tags["mlflow.runName"] for r in project.children(parent)}


def test_distil_student(project: Project, tmp_path: Path, spark, make_settings) -> None:  # type: ignore[no-untyped-def]
    lake = make_settings()
    ingest(spark, lake)
    teacher = make_tiny_model_dir(tmp_path / "tiny-llama")
    student = tiny_slm_settings(tmp_path, teacher, "full").model_copy(update={"data_dir": lake.data_dir})
    config = config_file(student, tmp_path)  # its mlflow.tracking_uri yields to MLFLOW_TRACKING_URI
    distilled, _ = project.run("distil_student", config, student_layers="2", steps="3")
    assert distilled.data.params["slmrec.steps"] == "3" and distilled.data.tags["teacher.encoder_id"]
