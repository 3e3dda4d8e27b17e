"""The validation gate on pandas batches: each planted defect stops publication, keeps the previous version
current and lands in the quarantine table with its reason."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmfeat.config import ValidationConf
from llmfeat.delta_io import RustDelta
from llmfeat.validation import (
    GateFailed,
    drift_suite,
    feature_suite,
    gate,
    norm_bounds_from,
    raw_suite,
    repr_suite,
    training_set_suite,
)
from llmfeat.validation.suites import Suite

pytestmark = pytest.mark.unit
DIM = 8
NOW = pd.Timestamp.now(tz="UTC").floor("s")


@pytest.fixture
def tables(tmp_path: Path) -> RustDelta:
    return RustDelta(tmp_path / "lake" / "delta")


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=dim).astype("float32") for _ in range(n)]


def items_repr(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in range(n)],
            "layer": 15,
            "vector": _vectors(n),
            "encoder_id": "smollm2-135m",
            "weights_hash": "w1",
            "pooling": "mean",
            "max_length": 64,
            "content_hash": [f"c{i}" for i in range(n)],
            "encoded_at": NOW,
        }
    )


def item_features(n: int = 6, dtype: str = "float16") -> pd.DataFrame:
    vectors = _vectors(n)
    if dtype == "int8":
        vectors = [np.clip(np.round(v * 40), -127, 127).astype("int8") for v in vectors]
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in range(n)],
            "vector": vectors,
            "scale": 0.025,
            "event_timestamp": NOW - pd.Timedelta(hours=1),
            "source_version": 3,
            "encoder_id": "smollm2-135m",
            "layer": 15,
            "compressor_name": "marc",
            "compressor_version": "2",
            "dtype": dtype,
        }
    )


def interactions(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [str(i % 3) for i in range(n)],
            "item_id": [str(i) for i in range(n)],
            "rating": [float(1 + i % 5) for i in range(n)],
            "label": [int(1 + i % 5 >= 4) for i in range(n)],
            "event_timestamp": [
                pd.Timestamp("2001-09-09", tz="UTC") + pd.Timedelta(days=i) for i in range(n)
            ],
            "split": ["train"] * (n - 2) + ["valid", "test"],
        }
    )


def publish(tables: RustDelta, name: str, frame: pd.DataFrame, suite: Suite, run_id: str = "job-1") -> int:
    """What a job does: gate, then commit (reached only when the gate passed)."""
    gate(frame, suite, table=name, tables=tables, run_id=run_id)
    return tables.upsert(name, frame, list(suite.keys))


def quarantined(tables: RustDelta, run_id: str) -> pd.DataFrame:
    q = tables.read_arrow("quarantine").to_pandas()
    return q[q["run_id"] == run_id].reset_index(drop=True)


def assert_stopped(tables: RustDelta, name: str, good: pd.DataFrame, version: int) -> None:
    """The failed publication committed nothing: same version, same rows."""
    assert tables.version(name) == version
    assert tables.read_arrow(name).num_rows == len(good)


def test_clean_tables_pass_every_suite(tables: RustDelta) -> None:
    bounds = norm_bounds_from(items_repr())
    reports = [
        gate(
            items_repr(),
            repr_suite("items", "item_id", DIM, bounds),
            table="items_repr",
            tables=tables,
            run_id="r",
        ),
        gate(
            item_features(),
            feature_suite("item_features", "item_id", DIM),
            table="f16",
            tables=tables,
            run_id="r",
        ),
        gate(
            item_features(dtype="int8"),
            feature_suite("item_features", "item_id", DIM, dtype="int8"),
            table="i8",
            tables=tables,
            run_id="r",
        ),
        gate(interactions(), raw_suite("interactions"), table="interactions", tables=tables, run_id="r"),
    ]
    assert all(r.success for r in reports)
    assert not tables.exists("quarantine")
    assert Path(reports[0].docs_page.removeprefix("file://")).is_file()


def test_nan_vector_is_stopped_and_quarantined(tables: RustDelta) -> None:
    good = items_repr()
    v0 = publish(tables, "items_repr", good, repr_suite("items", "item_id", DIM))
    bad = items_repr()
    bad.at[2, "vector"] = np.array([0.1] * (DIM - 1) + [np.nan], dtype="float32")
    with pytest.raises(GateFailed) as err:
        publish(tables, "items_repr", bad, repr_suite("items", "item_id", DIM), run_id="job-2")
    message = str(err.value)
    assert "expect_column_values_to_be_in_set(column=vector__finite" in message
    assert "item_id='2'" in message and f"table stays at version {v0}" in message
    assert_stopped(tables, "items_repr", good, v0)
    q = quarantined(tables, "job-2")
    assert q["row_key"].map(json.loads).tolist() == [{"item_id": "2", "layer": 15}]
    assert "vector__finite" in q.loc[0, "reasons"]
    assert json.loads(q.loc[0, "row"])["vector"][-1] != json.loads(q.loc[0, "row"])["vector"][-1]  # NaN kept


def test_wrong_dimension_is_stopped(tables: RustDelta) -> None:
    good = item_features()
    suite = feature_suite("item_features", "item_id", DIM)
    v0 = publish(tables, "item_features", good, suite)
    bad = item_features()
    bad.at[4, "vector"] = np.ones(DIM + 1, dtype="float32")
    with pytest.raises(GateFailed, match=r"vector__dim, min_value=8.0, max_value=8.0\): 1 of 6 rows"):
        publish(tables, "item_features", bad, suite, run_id="job-2")
    assert_stopped(tables, "item_features", good, v0)
    assert quarantined(tables, "job-2")["row_key"].tolist() == ['{"item_id": "4"}']


def test_duplicate_key_per_layer_is_stopped(tables: RustDelta) -> None:
    good = items_repr()
    v0 = publish(tables, "items_repr", good, repr_suite("items", "item_id", DIM))
    bad = pd.concat([items_repr(), items_repr().iloc[[3]]], ignore_index=True)
    other_layer = items_repr().iloc[[3]].assign(layer=20)  # same item at another layer is fine
    bad = pd.concat([bad, other_layer], ignore_index=True)
    with pytest.raises(GateFailed, match="expect_compound_columns_to_be_unique") as err:
        publish(tables, "items_repr", bad, repr_suite("items", "item_id", DIM), run_id="job-2")
    assert "2 of 8 rows" in str(err.value)
    assert_stopped(tables, "items_repr", good, v0)
    assert set(quarantined(tables, "job-2")["row_key"]) == {'{"item_id": "3", "layer": 15}'}


def test_future_timestamp_is_stopped(tables: RustDelta) -> None:
    good = interactions()
    v0 = publish(tables, "interactions", good, raw_suite("interactions"))
    bad = interactions()
    bad.loc[5, "event_timestamp"] = NOW + pd.Timedelta(days=2)
    with pytest.raises(
        GateFailed, match="expect_column_values_to_be_between\\(column=event_timestamp"
    ) as err:
        publish(tables, "interactions", bad, raw_suite("interactions"), run_id="job-2")
    assert "item_id='5'" in str(err.value)
    assert_stopped(tables, "interactions", good, v0)
    assert len(quarantined(tables, "job-2")) == 1


def test_collapsed_label_rate_quarantines_the_whole_batch(tables: RustDelta) -> None:
    good = interactions()
    v0 = publish(tables, "interactions", good, raw_suite("interactions"))
    bad = interactions().assign(label=0, rating=1.0)
    with pytest.raises(GateFailed, match=r"expect_column_mean_to_be_between\(column=label.*observed 0.0"):
        publish(tables, "interactions", bad, raw_suite("interactions"), run_id="job-2")
    assert_stopped(tables, "interactions", good, v0)
    q = quarantined(tables, "job-2")
    assert len(q) == len(bad)  # a table-level failure implicates every row: nothing is lost
    assert q["reasons"].str.contains("observed 0.0").all()


def test_training_set_feature_from_the_future_and_label_rate(tables: RustDelta) -> None:
    events = interactions()
    train = events.assign(
        user_features__event_timestamp=events["event_timestamp"] - pd.Timedelta(hours=1),
        item_features__event_timestamp=events["event_timestamp"] - pd.Timedelta(days=1),
    )
    train.loc[7, "item_features__event_timestamp"] = train.loc[7, "event_timestamp"] + pd.Timedelta(seconds=1)
    train.loc[8, "user_features__event_timestamp"] = pd.NaT  # no feature inside the TTL: allowed
    suite = training_set_suite(["user_features__event_timestamp", "item_features__event_timestamp"])
    with pytest.raises(GateFailed) as err:
        gate(train, suite, table="training_set", tables=tables, run_id="train-1")
    failures = err.value.report.failures
    assert [f.expectation.split("(")[0] for f in failures] == [
        "expect_column_pair_values_a_to_be_greater_than_b"
    ]
    assert "column_B=item_features__event_timestamp" in failures[0].expectation
    assert json.loads(quarantined(tables, "train-1").loc[0, "row_key"])["item_id"] == "7"


def test_int8_codes_scale_and_lineage(tables: RustDelta) -> None:
    suite = feature_suite("item_features", "item_id", DIM, dtype="int8")
    bad = item_features(dtype="int8")
    bad["vector"] = [v.astype("int16") for v in bad["vector"]]
    bad.at[0, "vector"] = np.array([300] + [0] * (DIM - 1), dtype="int16")  # not an int8 code
    bad.loc[1, "scale"] = 0.0
    bad.loc[2, "compressor_version"] = "3"  # two compressors in one publication
    with pytest.raises(GateFailed) as err:
        gate(bad, suite, table="item_features", tables=tables, run_id="c-1")
    names = {f.expectation for f in err.value.report.failures}
    assert (
        "expect_column_values_to_be_between(column=vector__max, min_value=-127.0, max_value=127.0)" in names
    )
    assert any("column=scale" in n for n in names)
    assert any("unique_value_count" in n and "compressor_version" in n for n in names)

    missing = item_features(dtype="int8").drop(columns=["source_version"])
    with pytest.raises(GateFailed, match="source_version.*could not be evaluated"):
        gate(missing, suite, table="item_features", tables=tables, run_id="c-2")


def test_norms_outside_the_reference_run(tables: RustDelta) -> None:
    reference = pd.concat([items_repr(), items_repr().assign(layer=29, vector=lambda d: d["vector"] / 100)])
    bounds = norm_bounds_from(reference, slack=2.0)
    assert bounds[15][0] > bounds[29][1]  # per layer: mid-layer norms dwarf the last layer's
    bad = items_repr()
    bad.at[1, "vector"] = bad.at[1, "vector"] * 1000
    with pytest.raises(GateFailed, match=r"vector__norm.*row_condition=.*layer.*1 of 6 rows"):
        gate(bad, repr_suite("items", "item_id", DIM, bounds), table="items_repr", tables=tables, run_id="e")


def test_drift_between_versions(tables: RustDelta) -> None:
    previous = item_features()
    same = item_features()
    same.at[0, "vector"] = same.at[0, "vector"] * 2  # a rescaled vector keeps its direction
    assert gate(same, drift_suite("item_features", "item_id", previous), table="item_features", tables=tables,
                run_id="d-1").success  # fmt: skip
    moved = item_features().assign(vector=_vectors(6, seed=1))
    with pytest.raises(GateFailed) as err:
        gate(moved, drift_suite("item_features", "item_id", previous), table="item_features", tables=tables,
             run_id="d-2")  # fmt: skip
    assert [f.expectation.split(",")[0] for f in err.value.report.failures] == [
        "expect_column_mean_to_be_between(column=cosine",
        "expect_column_mean_to_be_between(column=changed",
    ]


def test_bounds_come_from_config(tables: RustDelta) -> None:
    strict = ValidationConf(label_rate=(0.5, 0.9), earliest_timestamp=dt.datetime(2001, 9, 12, tzinfo=dt.UTC))
    with pytest.raises(GateFailed) as err:
        gate(
            interactions(), raw_suite("interactions", strict), table="interactions", tables=tables, run_id="x"
        )
    failed = " ".join(f.expectation for f in err.value.report.failures)
    assert "column=label" in failed and "column=event_timestamp" in failed


def test_training_set_gate_reads_when_each_vector_became_valid_and_what_it_holds(tables: RustDelta) -> None:
    from llmfeat.config import load_settings
    from llmfeat.spark_jobs.training_set import Snapshot, check_training_set

    settings = load_settings("tiny", [f"data_dir={tables.root.parent}"])
    events = pd.to_datetime(["1998-01-01", "1998-02-01", "1998-03-01", "1998-04-01"], utc=True)
    as_of = events.max()
    frame = pd.DataFrame(
        {
            "user_id": ["1", "2", "3", "4"],
            "item_id": ["7", "7", "8", "8"],
            "event_timestamp": events,
            "label": [0, 1, 1, 0],
            "user_vector": _vectors(4),
            "item_vector": _vectors(4),
            "user_valid_from": events - pd.Timedelta(days=1),
            "user_history_until": [pd.NaT, *(events[1:] - pd.Timedelta(days=2))],  # first: demographics
            "item_valid_from": events,  # valid from the item's first availability: the same instant is fine
        }
    )
    views = {"user_marc_v1_fv": ("user_vector",), "item_marc_v1_fv": ("item_vector",)}
    snap = Snapshot(as_of, {}, ("svc",), views)
    assert check_training_set(settings, tables, frame, snap, "training_set").success
    same_instant = frame.assign(user_history_until=events)  # the text holds the row's own event
    with pytest.raises(GateFailed, match="column_B=user_marc_v1_fv_user_history_until.*4 of 4 rows"):
        check_training_set(settings, tables, same_instant, snap, "training_set")


STATE_VIEWS = {"user_state_item_marc_v1_fv": "newest_event_us", "item_state_fv": "item_newest_event_us"}


def fresh_frame() -> pd.DataFrame:
    """Four rows of a fresh-state training set (Delta's microsecond stamps), each joined to the state of
    strictly earlier events: the user state 1 microsecond before the row, the item's a minute before; the
    first user has no earlier event (null)."""
    events = pd.Series(
        pd.to_datetime(
            [
                "1998-01-01 10:00:00.000007",
                "1998-02-01 00:00:00.000000",
                "1998-03-01 08:00:00.500000",
                "1998-04-01 00:00:00.000000",
            ],
            utc=True,
        )
    ).dt.as_unit("us")
    micros = events.astype("int64")
    return pd.DataFrame(
        {
            "user_id": ["1", "2", "3", "4"],
            "item_id": ["7", "7", "8", "8"],
            "event_timestamp": events,
            "label": [0, 1, 1, 0],
            "event_count": [None, 3, 5, 2],
            "like_rate": [None, 0.4, 0.6, 0.5],
            "newest_event_us": pd.array([None, *(micros[1:] - 1)], dtype="Int64"),
            "item_event_count": [4, 5, 1, 2],
            "item_newest_event_us": micros - 60_000_000,
        }
    )


def test_training_set_gate_stops_a_state_holding_the_rows_own_event_or_a_later_one(tables: RustDelta) -> None:
    from llmfeat.config import load_settings
    from llmfeat.spark_jobs.training_set import Snapshot, check_training_set

    settings = load_settings("tiny", [f"data_dir={tables.root.parent}"])
    frame = fresh_frame()
    views = {
        "user_state_item_marc_v1_fv": ("event_count", "like_rate"),
        "item_state_fv": ("item_event_count", "item_newest_event_us"),
    }
    snap = Snapshot(frame["event_timestamp"].max(), {}, ("ctr_fresh_id_v1",), views, {}, STATE_VIEWS)
    assert check_training_set(settings, tables, frame, snap, "training_set").success
    micros = frame["event_timestamp"].astype("int64")
    # user 3's state holds its own event (newest_event_us == the row's time)
    own = frame.assign(newest_event_us=frame["newest_event_us"].where(frame.index != 2, micros[2]))
    with pytest.raises(
        GateFailed, match="column_B=user_state_item_marc_v1_fv_newest_event_us.*1 of 4 rows"
    ) as e:
        check_training_set(settings, tables, own, snap, "training_set_own")
    (failure,) = e.value.report.failures
    assert [(x["user_id"], x["item_id"]) for x in failure.examples] == [("3", "8")]
    assert "user_id='3'" in str(e.value) and e.value.report.quarantined == 1
    # later events: item 7's state at user 2's row holds one an hour after the row, user 4's one 1 us after
    later = frame.assign(
        item_newest_event_us=frame["item_newest_event_us"].where(frame.index != 1, micros + 3_600_000_000),
        newest_event_us=frame["newest_event_us"].where(frame.index != 3, micros[3] + 1),
    )
    with pytest.raises(GateFailed, match="column_B=item_state_fv_item_newest_event_us.*1 of 4 rows") as e:
        check_training_set(settings, tables, later, snap, "training_set_later")
    failed = {
        f.expectation.split("column_B=")[1].split(",")[0].rstrip(")"): f for f in e.value.report.failures
    }
    assert set(failed) == {"item_state_fv_item_newest_event_us", "user_state_item_marc_v1_fv_newest_event_us"}
    named = {c: [(x["user_id"], x["item_id"]) for x in f.examples] for c, f in failed.items()}
    assert named == {
        "item_state_fv_item_newest_event_us": [("2", "7")],
        "user_state_item_marc_v1_fv_newest_event_us": [("4", "8")],
    }
    quarantined = tables.read_arrow("quarantine").to_pandas()
    keys = [json.loads(k) for k in quarantined.loc[quarantined["table"] == "training_set_later", "row_key"]]
    assert sorted((k["user_id"], k["item_id"]) for k in keys) == [("2", "7"), ("4", "8")]
    # without the field the gate cannot check the view: it says so instead of passing
    with pytest.raises(ValueError, match="lacks newest_event_us of user_state_item_marc_v1_fv"):
        check_training_set(settings, tables, frame.drop(columns="newest_event_us"), snap, "training_set")


def test_training_set_fetches_the_newest_event_of_every_state_view_and_pins_its_table() -> None:
    from types import SimpleNamespace as NS

    from llmfeat.feast_join import TrainingSetError
    from llmfeat.spark_jobs.training_set import delta_versions, state_views, time_refs

    def view(name: str, entity: str, fields: list[str], kind: str) -> NS:
        return NS(name=name, entities=[entity], features=[NS(name=f) for f in fields], tags={"kind": kind})

    declared = [
        view("user_state_item_marc_v1_fv", "user", ["event_count", "newest_event_us"], "state"),
        view("item_state_fv", "item", ["item_event_count", "item_newest_event_us"], "state"),
        view("user_stats_fv", "user", ["user_impressions"], "counter"),
    ]
    store = NS(list_feature_views=lambda: declared)
    views = {"user_state_item_marc_v1_fv": ("event_count",), "item_state_fv": ("item_event_count",),
             "user_stats_fv": ("user_impressions",)}  # fmt: skip
    assert state_views(store, views) == STATE_VIEWS
    assert time_refs(store, views) == [
        "item_state_fv:item_newest_event_us",
        "user_state_item_marc_v1_fv:newest_event_us",
    ]
    assert time_refs(store, {"user_stats_fv": ("user_impressions",)}) == []  # no state view: nothing more
    tables = NS(exists=lambda t: t != "items", version=lambda t: 3)
    pinned = delta_versions(tables, [], state_views(store, views))  # type: ignore[arg-type]
    assert pinned["user_state_item_marc_v1"] == 3 and pinned["item_state"] == 3 and "items" not in pinned
    assert "item_state" not in delta_versions(tables, [])  # type: ignore[arg-type]
    declared[1] = view("item_state_fv", "item", ["item_event_count"], "state")
    with pytest.raises(TrainingSetError, match="state view item_state_fv .* no newest-event field"):
        state_views(store, views)


def test_candidates_gate_stops_a_seen_item_scored_minus_infinity(tables: RustDelta) -> None:
    from llmfeat.validation.suites import candidates_suite

    frame = pd.DataFrame(
        {
            "user_id": ["1", "2"],
            "candidate_items": [["7", "8", "9"], ["7", "9", "4"]],
            "candidate_scores": [
                np.array([3.0, 2.0, 1.0], "float32"),
                np.array([2.0, 1.0, -np.inf], "float32"),
            ],
            "model": "lite_llm4rec",
            "run_id": "r1",
            "event_timestamp": NOW,
        }
    )
    suite = candidates_suite("user_candidates", 3)
    with pytest.raises(GateFailed, match=r"candidate_scores__finite.*1 of 2 rows"):
        publish(tables, "user_candidates", frame, suite)
    assert not tables.exists("user_candidates") and tables.read_arrow("quarantine").num_rows == 1
