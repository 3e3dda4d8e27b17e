"""The gate on Spark DataFrames (what jobs hand it), and the ingest job stopped by a planted defect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmfeat.config import ValidationConf
from llmfeat.delta_io import RustDelta
from llmfeat.spark_jobs.ingest import main as ingest_main
from llmfeat.validation import GateFailed, gate, repr_suite, training_set_suite

pytestmark = pytest.mark.spark
TABLES = ["items", "users", "interactions", "behaviors", "user_behaviors"]
REPR_SCHEMA = (
    "item_id string, layer int, vector array<float>, encoder_id string, weights_hash string, pooling string, "
    "max_length int, content_hash string, encoded_at timestamp"
)


def _repr_rows(vectors: list[list[float]], ids: list[str]) -> list[tuple]:
    import datetime as dt

    at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return [(i, 15, v, "enc", "w1", "mean", 64, f"c{i}", at) for i, v in zip(ids, vectors, strict=True)]


def test_spark_repr_batch_with_nan_wrong_dim_and_duplicate(spark, tmp_path: Path) -> None:
    tables = RustDelta(tmp_path / "delta", spark)
    good = spark.createDataFrame(_repr_rows([[1.0, 0.0, 0.0]] * 3, ["1", "2", "3"]), REPR_SCHEMA)
    suite = repr_suite("items", "item_id", width=3)
    gate(good, suite, table="items_repr", tables=tables, run_id="encode-1")
    v0 = tables.upsert("items_repr", good, ["item_id", "layer"])

    rows = _repr_rows(
        [[1.0, float("nan"), 0.0], [1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], ["1", "2", "3", "3"]
    )
    bad = spark.createDataFrame(rows, REPR_SCHEMA)
    with pytest.raises(GateFailed) as err:
        gate(bad, suite, table="items_repr", tables=tables, run_id="encode-2")
    failed = {f.expectation.split("(")[1].split(",")[0] for f in err.value.report.failures}
    assert failed == {"column=vector__finite", "column=vector__dim", "column_list=['item_id'"}
    assert tables.version("items_repr") == v0
    q = tables.read_arrow("quarantine").to_pandas().sort_values("row_key")
    assert [json.loads(k)["item_id"] for k in q["row_key"]] == ["1", "2", "3", "3"]
    assert "spark-items_repr.html" in (err.value.report.docs_page or "")


def test_more_failing_rows_than_the_driver_takes_quarantine_the_batch_whole(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Past validation.max_failing_ids the gate does not bring every failing row id to the driver: it names
    the count and quarantines the whole batch, written by the executors (nothing is lost)."""
    tables = RustDelta(tmp_path / "delta", spark)
    ids = [str(i) for i in range(6)]
    rows = _repr_rows([[float("nan"), 0.0, 0.0]] * 4 + [[1.0, 0.0, 0.0]] * 2, ids)
    conf = ValidationConf(max_failing_ids=3)
    with pytest.raises(GateFailed, match=r"4 of 6 rows \(more than validation.max_failing_ids=3"):
        gate(spark.createDataFrame(rows, REPR_SCHEMA), repr_suite("items", "item_id", width=3),
             table="items_repr", tables=tables, run_id="encode-1", conf=conf)  # fmt: skip
    q = tables.read_arrow("quarantine").to_pandas()
    assert sorted(json.loads(k)["item_id"] for k in q["row_key"]) == ids
    assert q["reasons"].str.contains("vector__finite").all()


def test_spark_training_set_point_in_time(spark, tmp_path: Path) -> None:
    tables = RustDelta(tmp_path / "delta", spark)
    train = spark.sql(
        "SELECT * FROM VALUES "
        "('u1', 'i1', 1, TIMESTAMP'2025-01-02 00:00:00', TIMESTAMP'2025-01-01 00:00:00'), "
        "('u2', 'i2', 0, TIMESTAMP'2025-01-02 00:00:00', TIMESTAMP'2025-01-03 00:00:00'), "
        "('u3', 'i3', 0, TIMESTAMP'2025-01-02 00:00:00', NULL) "
        "AS t(user_id, item_id, label, event_timestamp, user_features__event_timestamp)"
    )
    with pytest.raises(GateFailed, match="column_B=user_features__event_timestamp.*1 of 3 rows") as err:
        gate(
            train,
            training_set_suite(["user_features__event_timestamp"]),
            table="ts",
            tables=tables,
            run_id="t",
        )
    assert err.value.report.failures[0].examples[0]["user_id"] == "u2"


def test_ingest_with_planted_defects_exits_nonzero_and_keeps_every_table(
    spark, ingested: Path, make_settings, source_dir: Path, capsys
) -> None:
    settings = make_settings()
    tables = RustDelta(settings.delta_root)
    before = {t: tables.version(t) for t in TABLES}
    lines = (source_dir / "interactions.csv").read_text().splitlines()
    lines[3] = "11,1,9,1000172800"  # rating 9 on a 1-5 scale
    lines[5] = "12,2,5,4102444800"  # the year 2100
    (source_dir / "interactions.csv").write_text("\n".join(lines) + "\n")

    overrides = [f"--set={o}" for o in _overrides(settings)]
    assert ingest_main(["--config", "tiny", *overrides]) == 1
    err = capsys.readouterr().err
    assert "validation failed for table 'interactions'" in err
    assert "expect_column_values_to_be_between(column=rating, min_value=1.0, max_value=5.0)" in err
    assert "column=event_timestamp" in err and "table stays at version" in err
    assert {t: tables.version(t) for t in TABLES} == before
    reasons = tables.read_arrow("quarantine").column("reasons").to_pylist()
    assert len(reasons) == 2 and any("rating" in r for r in reasons)


def _overrides(settings) -> list[str]:
    f = settings.ingest.files
    return [
        f"data_dir={settings.data_dir}",
        "ingest.source=files",
        f"ingest.files.interactions={f.interactions}",
        f"ingest.files.items={f.items}",
        f"ingest.files.users={f.users}",
    ]
