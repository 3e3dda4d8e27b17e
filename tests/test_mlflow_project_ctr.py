"""The MLflow Project's CTR entry points (train, compare, promote, abtest) under `mlflow run --env-manager
local`, on the tiny CTR lake; a file of its own, so that it runs beside the other entry points. The champion
is trained in the test's process by the job the train entry point runs (one `mlflow run` less: each starts
two Python processes that import torch and MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ctr_lake import build_lake
from test_mlflow_project import Project, config_file

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_ctr_entry_points_train_compare_promote_and_abtest(project: Project, tmp_path: Path) -> None:
    from llmfeat.cli.ctr_commands import train_models
    from llmfeat.config import load_settings

    config = config_file(build_lake(tmp_path / "ctr"), tmp_path)
    as_entry_point = [f"mlflow.tracking_uri={project.store}", "ctr.kind=deepfm", "ctr.max_epochs=2"]
    (champion,) = train_models(load_settings(str(config), as_entry_point), False, False, "champion")
    challenger, _ = project.run("train", config, llm="llm", alias="challenger", epochs="2")
    assert challenger.data.tags["ctr.uses_llm"] == "true" and "valid_auc" in challenger.data.metrics
    version = project.client.get_model_version_by_alias("llmfeat-ctr", "challenger")
    assert version.run_id == challenger.info.run_id != champion.run_id
    assert project.client.get_model_version_by_alias("llmfeat-ctr", "champion").run_id == champion.run_id

    compared, out = project.run("compare", config)
    assert compared.data.tags["compare.b_alias"] == "challenger" and "diff_auc" in compared.data.metrics
    promoted, _ = project.run("promote", config)
    assert promoted.data.tags["promotion.decision"] in {"promoted", "rejected"}
    abtest, _ = project.run("abtest", config)
    assert abtest.data.metrics
