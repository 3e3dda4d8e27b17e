"""The MLflow Project's CTR entry points (train, compare, promote, abtest) under `mlflow run --env-manager
local`, on the tiny CTR lake; a file of its own, so that it runs beside the other entry points."""

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
    config = config_file(build_lake(tmp_path / "ctr"), tmp_path)
    champion, _ = project.run("train", config, llm="no-llm", alias="champion", epochs="2")
    challenger, _ = project.run("train", config, llm="llm", alias="challenger", epochs="2")
    assert challenger.data.tags["ctr.uses_llm"] == "true" and "valid_auc" in challenger.data.metrics
    version = project.client.get_model_version_by_alias("llmfeat-ctr", "challenger")
    assert version.run_id in {champion.info.run_id, challenger.info.run_id}

    compared, out = project.run("compare", config)
    assert compared.data.tags["compare.b_alias"] == "challenger" and "diff_auc" in compared.data.metrics
    promoted, _ = project.run("promote", config)
    assert promoted.data.tags["promotion.decision"] in {"promoted", "rejected"}
    abtest, _ = project.run("abtest", config)
    assert abtest.data.metrics
