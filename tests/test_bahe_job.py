"""The BAHE job on local Spark, the tiny ingest tables and a tiny random-weight Llama folder (4 x 32)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_encoder import make_tiny_model_dir

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.sample import shortest_histories
from llmfeat.spark_jobs import bahe, bahe_encode
from llmfeat.user_text import history_cut_time

pytestmark = pytest.mark.spark
DAY = 86_400


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def settings(ingested: Path, make_settings: Callable[..., Settings], tiny_model: Path) -> Settings:
    s = make_settings(
        f"encode.model={tiny_model}", "encode.max_length=64", "encode.partitions=2",
        "bahe.layer=1", "bahe.deep=llm", "bahe.deep_layers=2", "bahe.out_dim=8", "bahe.behavior_dim=4",
        "bahe.max_epochs=2", "bahe.users_per_batch=2", "bahe.emb_dim=8", "marc.output_dtype=float16",
    )  # fmt: skip
    return s


def test_unchanged_behaviours_are_never_reencoded(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    tables = RustDelta(settings.delta_root)
    n = tables.read_arrow("behaviors").num_rows
    first = bahe_encode.run(spark, settings)
    assert (first.encoded, first.unchanged) == (n, 0)
    table = tables.read_arrow("behaviors_repr")
    assert set(table.column("layer").to_pylist()) == {1}  # only the shallow layers ran
    stamps = dict(zip(table["behavior_id"].to_pylist(), table["encoded_at"].to_pylist(), strict=True))

    again = bahe_encode.run(spark, settings)
    assert (again.encoded, again.unchanged, again.version) == (0, n, first.version)

    behaviors = tables.read_arrow("behaviors")
    new = pa.table({"behavior_id": ["feedbeef00000000"], "text": ["rated 4: Brand New (1998), Drama"]})
    tables.write("behaviors", pa.concat_tables([behaviors, new.cast(behaviors.schema)]))
    third = bahe_encode.run(spark, settings)
    assert (third.encoded, third.unchanged, third.tokens > 0) == (1, n, True)  # only the new text
    after = tables.read_arrow("behaviors_repr")
    kept = {
        k: t for k, t in zip(after["behavior_id"].to_pylist(), after["encoded_at"].to_pylist(), strict=True)
    }
    assert all(kept[k] == t for k, t in stamps.items())  # the old rows were not rewritten


def test_sample_encodes_only_the_sampled_users_behaviours(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    summary = bahe_encode.run(spark, settings, n_sample=1)
    assert summary.encoded == 2  # user 11: the shortest history (tied with 12, first by id), two behaviours
    assert summary.deleted == 0
    tables = RustDelta(settings.delta_root, spark)
    cut = history_cut_time(spark, tables, settings.bahe.history_cut)
    assert shortest_histories(tables.read_spark("user_behaviors"), cut, 2) == ["11", "12"]


def test_train_publishes_user_and_behaviour_vectors_with_lineage(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import mlflow

    bahe_encode.run(spark, settings)
    summary = bahe.run(spark, settings)
    assert (summary.users, summary.no_history, summary.missing) == (3, 0, "no missing behaviour vectors")
    tables = RustDelta(settings.delta_root)
    users = tables.read_arrow("user_bahe_features").sort_by("user_id")
    assert users["user_id"].to_pylist() == ["10", "11", "12"]
    assert {len(v) for v in users["vector"].to_pylist()} == {8}
    assert set(users["compressor_name"].to_pylist()) == {"bahe"}
    assert set(users["compressor_version"].to_pylist()) == {summary.run_id}
    assert set(users["layer"].to_pylist()) == {1} and set(users["source_table"].to_pylist()) == {
        "behaviors_repr"
    }
    assert (
        users["no_history"].to_pylist() == [False] * 3 and users["missing_behaviors"].to_pylist() == [0] * 3
    )
    behaviors = tables.read_arrow("behavior_features")
    assert behaviors.num_rows == tables.read_arrow("behaviors").num_rows
    assert {len(v) for v in behaviors["vector"].to_pylist()} == {4}
    run = mlflow.get_run(summary.run_id)
    assert run.data.tags["kind"] == "bahe-user-encoder"
    assert run.data.params["bahe.layer"] == "1" and run.data.params["behaviors.encoder_id"] == "tiny-llama"
    assert "best_valid_auc" in run.data.metrics


def test_missing_behaviours_are_reported_and_no_history_is_flagged(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    bahe_encode.run(spark, settings)
    tables = RustDelta(settings.delta_root)
    reprs = tables.read_arrow("behaviors_repr")
    ub = tables.read_arrow("user_behaviors")
    of_11 = ub.filter(pc.equal(ub["user_id"], "11")).sort_by("event_timestamp")
    lost = of_11["behavior_id"][0].as_py()  # user 11's first behaviour (day 2)
    tables.write("behaviors_repr", reprs.filter(pc.not_equal(reprs["behavior_id"], lost)))
    # cut after day 3: users 10 and 11 have two behaviours before it each, user 12 none
    cut = datetime.fromtimestamp(1_000_000_000 + 3 * DAY + DAY // 2, UTC).isoformat()
    s = Settings.model_validate(
        settings.model_dump() | {"bahe": settings.bahe.model_dump() | {"history_cut": cut}}
    )
    summary = bahe.run(spark, s)
    assert "1 behaviour events (1 behaviour ids, 1 users)" in summary.missing and lost in summary.missing
    users = tables.read_arrow("user_bahe_features").sort_by("user_id")
    assert users["no_history"].to_pylist() == [False, False, True]
    assert users["missing_behaviors"].to_pylist() == [0, 1, 0]
    assert np.isfinite(np.array(users["vector"].to_pylist())).all()  # user 12: the fallback vector


def test_cli_dispatches_to_the_job(spark, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from llmfeat.cli import main

    overrides = [
        f"data_dir={settings.data_dir}", f"encode.model={settings.encode.model}", "encode.max_length=64",
        "encode.partitions=2", "bahe.layer=1",
    ]  # fmt: skip
    args = ["bahe", "encode", "--sample-users", "1", "--config", "tiny"]
    assert main([*args, *[x for o in overrides for x in ("--set", o)]]) == 0
    assert "behaviors_repr: encoded 2 texts" in capsys.readouterr().out
    assert (
        main(["bahe", "train", "--config", "tiny", "--set", "bahe.nope=1"]) == 2
    )  # unknown key: config error
