"""The point-in-time training set on the executors (spark_jobs/training_set_spark.py): the as-of join's
semantics on hand-made rows, and on the tiny CTR lake the written Delta table equals Feast's own join (the
embedded path, llmfeat/feast_join.py) row for row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_ctr_lake import build_lake

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_join import TrainingSetError, ViewRows, as_of_join
from llmfeat.feast_repo import open_store
from llmfeat.spark_jobs import training_set_spark
from llmfeat.spark_jobs.training_set import build_frame

pytestmark = pytest.mark.spark
T = datetime(2024, 3, 1, 12, tzinfo=UTC)


def hours(h: float) -> datetime:
    return T + timedelta(hours=h)


def test_as_of_join_takes_the_newest_row_at_or_before_each_row_within_the_ttl(spark) -> None:  # type: ignore[no-untyped-def]
    rows = spark.createDataFrame(
        [("a", hours(0), 1), ("a", hours(5), 2), ("b", hours(0), 3), ("c", hours(0), 4), (None, hours(0), 5)],
        "user_id string, event_timestamp timestamp, row int",
    )
    counts = spark.createDataFrame(  # no TTL: the newest at or before the row, however old
        [("a", hours(-30), 10, hours(0)), ("a", hours(0), 11, hours(0)), ("a", hours(0), 12, hours(1)),
         ("a", hours(1), 13, hours(0)), ("b", hours(-1), 20, hours(0)), ("b", hours(2), 21, hours(0)),
         (None, hours(-1), 99, hours(0))],
        "user_id string, event_timestamp timestamp, n int, created timestamp",
    )  # fmt: skip
    scores = spark.createDataFrame(  # a 2-hour TTL: older values are no value
        [("a", hours(-3), 0.5), ("a", hours(4), 0.7), ("b", hours(-1), 0.9)],
        "user_id string, event_timestamp timestamp, score_col double",
    )
    two_hours, column = timedelta(hours=2), {"score": "score_col"}
    views = [
        ViewRows("counts", counts, ("user_id",), ("n",), created="created"),
        ViewRows("scores", scores, ("user_id",), ("score",), ttl=two_hours, mapping=column),
    ]
    out = as_of_join(rows, views).toPandas().sort_values("row")
    assert out.columns.tolist() == ["user_id", "event_timestamp", "row", "n", "score"]
    # a at 0: the two rows stamped exactly then, the later created one; its score is 3 h old (> TTL)
    # a at 5: the row of hour 1, never the future; the score of hour 4. b at 0: hour -1's, not hour 2's.
    # c has no value, and a null key matches nothing
    assert out["n"].tolist()[:3] == [12, 13, 20] and out["n"].isna().tolist()[3:] == [True, True]
    assert out["score"].isna().tolist() == [True, False, False, True, True]
    assert out["score"].dropna().tolist() == [0.7, 0.9]
    with pytest.raises(TrainingSetError, match=r"features \['n'\] would be joined twice"):
        as_of_join(rows.withColumnRenamed("row", "n"), views[:1])


def comparable(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """Each column as plain values in one row order: numbers as floats, vectors as lists, times in UTC,
    None for every kind of missing value (Feast's pandas and Spark's Arrow spell them differently)."""

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray | list):
            return [float(x) for x in v]
        if v is None or v is pd.NaT or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, datetime):
            stamp = pd.Timestamp(v)
            return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return float(v) if isinstance(v, int | float | np.number) and not isinstance(v, bool) else v

    ordered = frame.sort_values(["user_id", "item_id", "event_timestamp", "label"]).reset_index(drop=True)
    return {c: [plain(v) for v in ordered[c]] for c in ordered.columns}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return build_lake(tmp_path_factory.mktemp("ctr-spark"))


@pytest.mark.integration
def test_the_set_built_on_spark_is_feasts_join_row_for_row(spark, lake: Settings) -> None:  # type: ignore[no-untyped-def]
    tables = RustDelta(lake.delta_root)
    embedded, snapshot = build_frame(lake, tables, open_store(lake), [lake.ctr.llm_feature_service])
    summary = training_set_spark.run(spark, lake)
    table = training_set_spark.training_table(lake.ctr.llm_feature_service)
    written = tables.read_arrow(table).to_pandas()
    assert len(written) == len(embedded) == tables.read_arrow("interactions").num_rows
    want, got = comparable(embedded), comparable(written)
    assert sorted(got) == sorted(want)
    for column in want:
        assert got[column] == want[column], column
    assert written["user_vector"].notna().all() and written["item_impressions"].isna().any()
    assert (
        summary.snapshot.delta_versions == snapshot.delta_versions
        and summary.snapshot.as_of == snapshot.as_of
    )
    assert sum(summary.rows.values()) == len(written) and summary.described["item_vector_present"] == 1.0
    assert f"Delta table {table}, version 0" in summary.report()


def test_main_builds_the_set_on_the_executors(spark, lake: Settings, capsys) -> None:  # type: ignore[no-untyped-def]
    """`spark-submit spark_jobs/training_set_spark.py` runs this: the id service's set, written, described."""
    args = ["--config", "tiny", f"--set=data_dir={lake.data_dir}", "--no-llm"]
    assert training_set_spark.main(args) == 0
    out = capsys.readouterr().out
    assert "training set of ctr_id_v2" in out and "written to: Delta table training_set_ctr_id_v2" in out
    tables = RustDelta(lake.delta_root)
    rows = tables.read_arrow("training_set_ctr_id_v2").num_rows
    assert rows == tables.read_arrow("interactions").num_rows and f"{rows:,} rows" in out
