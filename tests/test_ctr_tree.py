"""The LightGBM family on the tiny lake: trained from Feast, registered with its family and requirements,
served through the array path, compared with and promoted over a DNN."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_ctr_lake import build_lake, fresh_copy, no_open_run, train_both  # noqa: F401
from test_serving_ranking import call, in_thread, serving_models

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import open_store
from llmfeat.models.ctr.pyfunc import TreeRanker, load_ranker
from llmfeat.registry import tracking_uri
from llmfeat.serving.arms import registry_loader
from llmfeat.serving.event_log import EventLog
from llmfeat.serving.ranking_service import create_app
from llmfeat.spark_jobs.compare import promote
from llmfeat.spark_jobs.train_ctr import run as train
from llmfeat.spark_jobs.training_set import build_frame

pytestmark = pytest.mark.integration

TREE = ("ctr.kind=lightgbm", "ctr.tree_min_leaf=5")  # a few hundred rows: small leaves


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Trees as champion (ids) and challenger (+ LLM vectors)."""
    settings = build_lake(tmp_path_factory.mktemp("tree"), *TREE)
    train_both(settings)
    return settings


def client(settings: Settings) -> mlflow.MlflowClient:
    uri = tracking_uri(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_trees_are_registered_with_their_family_lineage_and_lightgbm(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path, *TREE)
    c = client(settings)
    challenger = c.get_model_version_by_alias("llmfeat-ctr", "challenger")
    assert challenger.tags["model.family"] == "lightgbm" and challenger.tags["ctr.uses_llm"] == "true"
    assert challenger.tags["feast.feature_service"] == "ctr_marc_v2"
    assert "lineage.item.layer" in challenger.tags
    run = c.get_run(challenger.run_id)
    assert "test_auc_low" in run.data.metrics and c.get_metric_history(run.info.run_id, "tree_valid_logloss")
    mlflow.set_tracking_uri(tracking_uri(settings))
    uri = f"models:/llmfeat-ctr/{challenger.version}"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    assert "lightgbm==" in requirements and "llmfeat" not in requirements
    ranker = load_ranker(uri)
    assert isinstance(ranker, TreeRanker) and ranker.family == "lightgbm"
    frame, _ = build_frame(
        settings, RustDelta(settings.delta_root), open_store(settings), ["ctr_marc_v2"], "test"
    )
    p = ranker.score(frame)
    assert p.shape == (len(frame),) and ((p > 0) & (p < 1)).all() and p.std() > 0
    # a row without its item vector is scored (LightGBM's missing-value branch), not an error
    gone = frame.head(3).assign(item_vector=None)
    assert np.isfinite(ranker.score(gone)).all()


def test_a_tree_champion_ranks_through_the_array_path(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path, *TREE)
    models = serving_models(settings, registry_loader(settings))
    for arm in ("champion", "challenger"):
        assert models.get(arm).score.fast, arm  # score_arrays agreed with score on the probe
    events = EventLog(tmp_path / "events", flush_every=5, flush_interval_s=0.2)
    with in_thread(create_app(settings.serving, models, events)) as url:
        status, reply = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2", "3", "4", "nope"]})
    assert status == 200, reply
    scores = [i["score"] for i in reply["items"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5


def test_a_dnn_challenger_is_compared_with_and_promoted_over_a_tree_champion(
    lake: Settings, tmp_path: Path
) -> None:
    lax = ("promotion.min_auc_lift=-1", "promotion.max_delong_p=1.01", "promotion.max_logloss_increase=10")
    settings = fresh_copy(lake, tmp_path, "ctr.kind=dnn", *lax)
    (dnn,) = train(None, settings, use_llm=True, alias="challenger")
    tables, store = RustDelta(settings.delta_root), open_store(settings)
    outcome = promote(settings, tables, store, "champion", "challenger")
    assert outcome.moved, outcome.report()
    c = client(settings)
    champion = c.get_model_version_by_alias("llmfeat-ctr", "champion")
    assert str(champion.version) == dnn.version and champion.tags["model.family"] == "dnn"
    assert c.get_model_version_by_alias("llmfeat-ctr", "previous-champion").tags["model.family"] == "lightgbm"
    assert "AUC" in outcome.comparison.table().to_string()
