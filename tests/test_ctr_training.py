"""Training from a Feast training set, MLflow lineage and registry, offline comparison and the promotion gate,
on the tiny lake (tests/test_ctr_lake.py) with a fresh SQLite MLflow store per test."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from test_ctr_lake import build_lake, fresh_copy, no_open_run, train_both  # noqa: F401

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import open_store
from llmfeat.models.ctr.pyfunc import load_ranker
from llmfeat.registry import ModelNotFound, resolve, tracking_uri
from llmfeat.spark_jobs import compare as compare_job
from llmfeat.spark_jobs import training_set
from llmfeat.spark_jobs.compare import compare, promote
from llmfeat.spark_jobs.training_set import build_frame, check_training_set
from llmfeat.validation import GateFailed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Published and materialized tables; the MLflow store of this module's template holds both models."""
    settings = build_lake(tmp_path_factory.mktemp("ctr"))
    train_both(settings)
    return settings


def client(settings: Settings) -> mlflow.MlflowClient:
    uri = tracking_uri(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_training_set_is_the_point_in_time_join_of_every_interaction(lake: Settings) -> None:
    frame, snap = build_frame(lake, RustDelta(lake.delta_root), open_store(lake), ["ctr_marc_v2"])
    rows = RustDelta(lake.delta_root).read_arrow("interactions").to_pandas()
    assert len(frame) == len(rows)  # exactly the interaction rows, none dropped by the join
    assert frame["user_vector"].notna().all() and frame["item_vector"].notna().all()
    # each row got a vector valid at its own time, never a later one
    ts = pd.to_datetime(frame["event_timestamp"], utc=True)
    assert (pd.to_datetime(frame["user_valid_from"], utc=True) <= ts).all()
    assert (pd.to_datetime(frame["item_valid_from"], utc=True) <= ts).all()
    # counters count only earlier days: a user's first row has none
    first = frame.sort_values("event_timestamp").groupby("user_id").head(1)
    assert first["user_impressions"].fillna(0).eq(0).all()
    assert frame["item_impressions"].fillna(0).max() > 0  # items recur across days (users do not, here)
    assert snap.delta_versions["interactions"] == 0 and "ctr_marc_v2" in snap.services
    assert "item.compressor_version" in snap.lineage


def test_training_set_job_gates_and_describes_the_set(lake: Settings, tmp_path: Path) -> None:
    """`spark-submit spark_jobs/training_set.py` runs this: the set of the LLM service, gated, described."""
    summary = training_set.run(None, fresh_copy(lake, tmp_path))
    rows = RustDelta(lake.delta_root).read_arrow("interactions").to_pandas()
    assert summary.rows == {s: int((rows["split"] == s).sum()) for s in ("train", "valid", "test")}
    assert summary.label_rate["test"] == pytest.approx(rows.loc[rows["split"] == "test", "label"].mean())
    assert summary.described["user_vector_present"] == 1.0
    assert (
        summary.snapshot.services == ("ctr_marc_v2",)
        and "item.compressor_version" in summary.snapshot.lineage
    )
    report = summary.report()
    assert "gate: training_set_deepfm_llm: " in report and "delta.interactions" not in report
    assert "interactions@0" in report


def test_both_models_are_registered_with_lineage_metrics_and_plots(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path)
    c = client(settings)
    champion = c.get_model_version_by_alias("llmfeat-ctr", "champion")
    challenger = c.get_model_version_by_alias("llmfeat-ctr", "challenger")
    assert champion.tags["ctr.uses_llm"] == "false" and challenger.tags["ctr.uses_llm"] == "true"
    assert challenger.tags["feast.feature_service"] == "ctr_marc_v2"
    assert {"user_marc_v1_fv", "item_marc_v1_fv", "item_meta_fv", "user_stats_fv"} <= set(
        challenger.tags["feast.feature_views"].split(",")
    )
    for key in ("delta.interactions.version", "delta.feast_item_marc_v1.version", "lineage.item.layer",
                "lineage.user.encoder_id", "lineage.item.compressor_version", "snapshot.as_of"):  # fmt: skip
        assert key in challenger.tags, key
    run = c.get_run(challenger.run_id)
    for key in ("test_auc", "test_auc_low", "test_gauc_high", "test_logloss", "valid_auc", "test_cold_auc"):
        assert key in run.data.metrics, key
    assert len(c.get_metric_history(run.info.run_id, "residual_valid_auc")) >= 1  # per epoch
    assert run.data.params["ctr.kind"] == "deepfm"
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/roc_test.png", "plots/calibration_test.png"}
    info = mlflow.models.get_model_info(f"models:/llmfeat-ctr/{challenger.version}")
    assert info.signature is not None and "user_vector" in info.signature.inputs.input_names()
    assert info.saved_input_example_info is not None
    # the training set passed its gate, and the run links that gate's Data Docs page
    assert run.data.tags["validation.training_set_deepfm_llm"].startswith("passed (training_set_deepfm_llm")
    page = Path(run.data.tags["data_docs.training_set_deepfm_llm"].removeprefix("file://"))
    assert page.is_file() and "user_marc_v1_fv_user_history_until" in page.read_text()
    # and the newest gate pages of the Feast tables it read (gated by materialize)
    assert run.data.tags["validation.input.feast_item_marc_v1"].startswith("passed (run materialize-")
    assert Path(run.data.tags["data_docs.input.feast_user_marc_v1"].removeprefix("file://")).is_file()


def test_training_set_gate_stops_future_vectors_own_labels_and_collapsed_labels(
    lake: Settings, tmp_path: Path
) -> None:
    frame, snap = build_frame(lake, RustDelta(lake.delta_root), open_store(lake), ["ctr_marc_v2"])
    scratch = RustDelta(tmp_path / "delta")  # quarantine and Data Docs of this test only
    assert check_training_set(lake, scratch, frame, snap, "training_set").success
    ts = pd.to_datetime(frame["event_timestamp"], utc=True)
    # a vector stamped after its row
    future = frame.assign(user_valid_from=ts.where(frame.index >= 3, ts + pd.Timedelta(hours=1)))
    with pytest.raises(GateFailed, match="column_B=user_marc_v1_fv_user_valid_from") as failed:
        check_training_set(lake, scratch, future, snap, "training_set")
    assert failed.value.report.quarantined == 3 and failed.value.report.version is None
    quarantined = scratch.read_arrow("quarantine").to_pandas()
    keys = [json.loads(k) for k in quarantined["row_key"]]
    assert {k["user_id"] for k in keys} == set(frame.loc[:2, "user_id"])
    # a vector whose text holds the row's own event (its label)
    own = frame.assign(user_history_until=ts.where(frame.index >= 2, ts))
    with pytest.raises(GateFailed, match="column_B=user_marc_v1_fv_user_history_until"):
        check_training_set(lake, scratch, own, snap, "training_set")
    with pytest.raises(GateFailed, match="expect_column_mean_to_be_between.column=label"):
        check_training_set(lake, scratch, frame.assign(label=0), snap, "training_set")


def test_registered_model_scores_a_frame_like_the_service_builds(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path)
    mlflow.set_tracking_uri(tracking_uri(settings))
    ref = resolve("llmfeat-ctr", "challenger", tracking_uri(settings))
    frame, _ = build_frame(
        settings, RustDelta(settings.delta_root), open_store(settings), ["ctr_marc_v2"], "test"
    )
    p = load_ranker(ref.uri).score(frame)
    assert p.shape == (len(frame),) and ((p > 0) & (p < 1)).all()


def test_compare_logs_a_run_and_the_gate_decides_promotion(lake: Settings, tmp_path: Path) -> None:
    strict = fresh_copy(lake, tmp_path, "promotion.min_auc_lift=0.5")
    tables, store = RustDelta(strict.delta_root), open_store(strict)
    kept = promote(strict, tables, store, "champion", "challenger")
    assert not kept.moved and "promotion rule not met" in kept.comparison.reason
    c = client(strict)
    assert c.get_model_version_by_alias("llmfeat-ctr", "champion").tags["ctr.uses_llm"] == "false"
    challenger = c.get_model_version_by_alias("llmfeat-ctr", "challenger")
    assert challenger.tags["promotion.decision"] == "rejected"
    run = c.get_run(kept.comparison.run_id)
    assert run.data.tags["compare.passed"] == "false" and "diff_auc_low" in run.data.metrics
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {
        "comparison.json",
        "comparison.txt",
        "plots",
    }
    assert "resample users" in kept.report() and "[" in kept.comparison.table().iloc[0, 1]

    lax = strict.model_copy(
        update={
            "promotion": strict.promotion.model_copy(
                update={"min_auc_lift": -1.0, "max_delong_p": 1.01, "max_logloss_increase": 10.0}
            )
        }  # fmt: skip
    )
    moved = promote(lax, tables, store, "champion", "challenger")
    assert (
        moved.moved and c.get_model_version_by_alias("llmfeat-ctr", "champion").version == challenger.version
    )
    assert c.get_model_version_by_alias("llmfeat-ctr", "previous-champion").tags["ctr.uses_llm"] == "false"


def test_unknown_alias_is_a_clear_error(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path)
    with pytest.raises(ModelNotFound, match="llmfeat-ctr@nope.*train-ctr"):
        compare(settings, RustDelta(settings.delta_root), open_store(settings), "champion", "nope")
    with pytest.raises(ModelNotFound, match="llmfeat-ctr@nope"):
        compare_job.run(None, settings, "nope", "challenger")


def test_two_interactions_in_one_second_both_get_their_features(lake: Settings) -> None:
    """Feast's file store keeps one row per (keys, time): the join must not lose the second interaction."""
    from llmfeat.feast_join import historical_features

    at = pd.Timestamp("2001-03-01 12:00:00", tz="UTC")
    rows = pd.DataFrame({"user_id": ["1", "1"], "item_id": ["3", "4"], "event_timestamp": [at, at]})
    refs = ["user_marc_v1_fv:user_vector", "item_marc_v1_fv:item_vector"]
    out = historical_features(open_store(lake), rows, refs)
    assert len(out) == 2 and out["user_vector"].notna().all() and out["item_vector"].notna().all()
    assert out["item_id"].tolist() == ["3", "4"]
    assert not np.array_equal(out["item_vector"][0], out["item_vector"][1])


def test_challenger_run_logs_the_branch_dropout_and_fold_logloss(lake: Settings, tmp_path: Path) -> None:
    """The branch's id dropout rates (the valid period's cold rates) and its selection score are tracked."""
    settings = fresh_copy(lake, tmp_path)
    c = client(settings)
    run = c.get_run(c.get_model_version_by_alias("llmfeat-ctr", "challenger").run_id)
    for side in ("user", "item"):
        assert 0.0 <= run.data.metrics[f"residual_{side}_id_dropout"] <= 1.0
    folds = c.get_metric_history(run.info.run_id, "residual_valid_fold_logloss")
    assert folds and all(m.step >= 1000 and m.value > 0 for m in folds)
    assert (
        "residual_valid_fold_logloss"
        not in c.get_run(c.get_model_version_by_alias("llmfeat-ctr", "champion").run_id).data.metrics
    )
