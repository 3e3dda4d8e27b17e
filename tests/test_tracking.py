"""The MLFLOW_* variables win over the config (llmfeat/registry.py), as `mlflow run` and users set them; an
MlflowException reaches the user as one line that says what to do. A fresh SQLite store per test."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from llmfeat import registry
from llmfeat.config import Settings, load_settings
from llmfeat.registry import TrackingError, artifact_location, tracking_uri, use_tracking
from llmfeat.runner import one_line

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for name in registry.ENV:
        monkeypatch.setitem(registry.ENV, name, None)
    return load_settings("tiny", [f"data_dir={tmp_path / 'lake'}", "marc.experiment=from-config"])


def started_with(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """As if the process had started with name=value (llmfeat reads the MLFLOW_* variables once, at import:
    MLflow itself writes some of them when a job picks its store or experiment)."""
    monkeypatch.setenv(name, value)
    monkeypatch.setitem(registry.ENV, name, value)


def started_with_store(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    started_with(monkeypatch, "MLFLOW_TRACKING_URI", uri)


@pytest.fixture(autouse=True)
def no_open_run():  # type: ignore[no-untyped-def]
    yield
    if mlflow.active_run() is not None:
        mlflow.end_run()
        pytest.fail("test left an MLflow run open")


def test_tracking_uri_env_beats_config_beats_default(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracking_uri(settings) == f"sqlite:///{tmp_path / 'lake' / 'mlflow' / 'mlflow.db'}"
    assert artifact_location(settings) is not None  # artefacts next to the default store
    configured = settings.model_copy(
        update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": "http://configured:5000"})}
    )
    assert tracking_uri(configured) == "http://configured:5000"
    assert artifact_location(configured) is None  # that store decides
    started_with_store(monkeypatch, f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking_uri(configured) == f"sqlite:///{tmp_path / 'env.db'}"
    assert (
        artifact_location(settings) == (tmp_path / "artifacts").resolve().as_uri()
    )  # beside any SQLite file


def test_a_run_opened_by_mlflow_run_is_resumed_in_its_own_experiment(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path / 'project.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    opened = client.create_run(client.create_experiment("project")).info  # what `mlflow run` does
    started_with_store(monkeypatch, store)
    started_with(monkeypatch, "MLFLOW_RUN_ID", opened.run_id)
    started_with(monkeypatch, "MLFLOW_EXPERIMENT_ID", opened.experiment_id)

    exp_id = use_tracking(settings, settings.marc.experiment)
    assert exp_id == opened.experiment_id  # not the configured "from-config"
    with mlflow.start_run(run_name="the job") as run:
        mlflow.log_param("p", 1)
    assert run.info.run_id == opened.run_id
    assert client.get_run(opened.run_id).data.params == {"p": "1"}
    assert client.get_experiment_by_name("from-config") is None


def test_experiment_name_from_the_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    started_with(monkeypatch, "MLFLOW_EXPERIMENT_NAME", "from-env")
    exp_id = use_tracking(settings, settings.marc.experiment)
    assert mlflow.get_experiment(exp_id).name == "from-env"


def test_an_unusable_store_is_one_line_that_says_what_to_do(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_with_store(monkeypatch, "nosuch://store")
    with pytest.raises(TrackingError) as err:
        use_tracking(settings, settings.marc.experiment)
    line = str(err.value)
    assert "\n" not in line and line.startswith("MLflow at nosuch://store: ")
    assert "MLFLOW_TRACKING_URI" in line

    wrapped = mlflow.MlflowException("Registered Model with name=x not found\nmore detail")
    assert one_line(wrapped, settings).startswith("MLflow at nosuch://store: Registered Model with name=x")
    assert "\n" not in one_line(wrapped, settings)
