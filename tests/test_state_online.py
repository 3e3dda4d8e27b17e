"""The event path on the tiny lake: events pushed one by one online give the state the batch job computed for
the same time; pushes are idempotent, ordered and safe from two workers at once; a refresh never clobbers a
newer pushed state. On SQLite and on a real redis-server."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_ctr_lake import build_lake, lake_settings

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import apply_repo, open_store
from llmfeat.models.ctr.state import from_row, update
from llmfeat.reprs import USER_STATE_COLUMNS, UserStateView
from llmfeat.serving.local_servers import redis_server
from llmfeat.serving.state_store import Event, OnlineState
from llmfeat.spark_jobs import materialize, user_state

pytestmark = pytest.mark.spark

TABLE = UserStateView("item_marc", "1").table


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory: pytest.TempPathFactory) -> Settings:  # type: ignore[no-untyped-def]
    settings = build_lake(tmp_path_factory.mktemp("state_online"), "state.item_version=1")
    user_state.run(spark, settings)
    return settings


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request, lake: Settings, tmp_path: Path) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    """The lake's Delta tables with an empty online store of each kind (the state not yet materialized)."""
    fresh = {"feast.online_store": request.param, "feast.repo_dir": str(tmp_path / "feast")}
    if request.param == "sqlite":
        yield with_online(lake, fresh)
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    with redis_server() as conn:
        yield with_online(lake, fresh | {"feast.redis": conn})


def with_online(lake: Settings, changes: dict[str, str]) -> Settings:
    data = lake.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    settings = Settings.model_validate(data)
    store = apply_repo(settings)
    materialize.materialize(store, ["item_marc_v1_fv", "item_marc_v1_lineage_fv"], full=True)
    return settings


def offline(settings: Settings) -> pd.DataFrame:
    rows = RustDelta(settings.delta_root).read_arrow(TABLE).to_pandas()
    return rows.sort_values(["user_id", "event_timestamp"]).reset_index(drop=True)


def events_of(settings: Settings, user: str) -> list[Event]:
    inter = RustDelta(settings.delta_root).read_arrow("interactions").to_pandas()
    mine = inter[inter["user_id"] == user].sort_values("event_timestamp")
    return [
        Event(f"{user}-{i}", user, r.item_id, int(r.label), r.event_timestamp.value // 1000)
        for i, r in enumerate(mine.itertuples())
    ]


def assert_same(online: dict, row: pd.Series) -> None:
    for column in USER_STATE_COLUMNS:
        want, got = row[column], online[column]
        if isinstance(got, np.ndarray):
            np.testing.assert_allclose(got, np.asarray(want, dtype=np.float32), rtol=1e-5, atol=1e-6)
        else:
            assert got == pytest.approx(want), column


def test_events_pushed_one_by_one_equal_the_batch_rows(store_settings: Settings) -> None:
    state = OnlineState.open(store_settings, open_store(store_settings))
    rows = offline(store_settings)
    for user in ("3", "17"):
        mine = rows[rows["user_id"] == user].reset_index(drop=True)
        for event, (_, row) in zip(events_of(store_settings, user), mine.iterrows(), strict=True):
            assert state.push([event]).applied == [event.event_id]
            assert_same(state.read(state.views.user, "user_id", user), row)
        item = state.read(state.views.item, "item_id", event.item_id)
        assert item is not None and item["item_event_count"] >= 1
    # the ranking service's reader and Feast's own read see the pushed row
    features = open_store(store_settings).get_online_features(
        [f"{state.views.user.name}:event_count"], [{"user_id": "17"}]
    )
    assert features.to_dict()["event_count"] == [len(events_of(store_settings, "17"))]


def test_a_repeated_event_and_an_older_one_change_nothing(store_settings: Settings) -> None:
    state = OnlineState.open(store_settings, open_store(store_settings))
    first, second, *_ = events_of(store_settings, "5")
    assert state.push([first, second]).applied == [first.event_id, second.event_id]
    before = state.read(state.views.user, "user_id", "5")
    again = state.push([second])
    assert again.duplicates == [second.event_id] and not again.applied
    older = Event("late", "5", first.item_id, 1, first.at_us - 1)
    refused = state.push([older]).refused
    assert "older than user 5's newest event" in refused["late"]
    equal = Event("same-time", "5", first.item_id, 1, second.at_us)  # an equal time is applied
    assert state.push([equal]).applied == ["same-time"]
    after = state.read(state.views.user, "user_id", "5")
    assert after["event_count"] == before["event_count"] + 1
    assert applied_ids(state, "5") == {first.event_id, second.event_id, "same-time"}


def test_the_ids_kept_are_those_within_the_window_of_the_newest_event(store_settings: Settings) -> None:
    settings = store_settings.model_copy(
        update={"state": store_settings.state.model_copy(update={"event_id_window_s": 0})}
    )
    state = OnlineState.open(settings, open_store(settings))
    first, second, third, *_ = events_of(settings, "6")
    assert second.at_us > first.at_us and third.at_us > second.at_us
    for event in (first, second, third):
        assert state.push([event]).applied == [event.event_id]
        assert applied_ids(state, "6") == {event.event_id}  # window 0: only the ids at the newest time
    assert state.push([third]).duplicates == [third.event_id]
    assert first.event_id in state.push([first]).refused  # forgotten, and refused by its time


def applied_ids(state: OnlineState, user: str) -> set[str]:
    """The event ids the store remembers for a user."""
    from llmfeat.serving.state_store import APPLIED_TABLE, SqliteState

    b, key = state.backend, state.backend.key("user_id", user)
    if isinstance(b, SqliteState):
        sql = f"SELECT event_id FROM {APPLIED_TABLE} WHERE view = ? AND entity_key = ?"
        return {r[0] for r in b.conn.execute(sql, (state.views.user.name, key))}
    return {m.decode() for m in b.client.zrange(b.applied_key(state.views.user, key), 0, -1)}


def push_many(settings_json: str, worker: int, at_us: int, n: int) -> None:
    settings = Settings.model_validate_json(settings_json)
    state = OnlineState.open(settings, open_store(settings))
    for k in range(n):
        result = state.push([Event(f"w{worker}-{k}", "9", str(1 + (k % 40)), k % 2, at_us)])
        assert result.applied, result


def test_two_workers_pushing_the_same_user_lose_no_update(store_settings: Settings) -> None:
    at_us = events_of(store_settings, "9")[-1].at_us + 10**6
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=push_many, args=(store_settings.model_dump_json(), w, at_us, 40))
        for w in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    state = OnlineState.open(store_settings, open_store(store_settings))
    row = state.read(state.views.user, "user_id", "9")
    assert row["event_count"] == 80 and row["liked_count"] == 40


def test_a_steady_stream_of_pushes_keeps_the_sqlite_log_bounded(lake: Settings, tmp_path: Path) -> None:
    """Passive checkpoints alone never restart the WAL while pushes keep committing (it grew by ~12 KiB a
    push, 1.7 GB in the service's load test); the checkpointer's RESTART makes the next push start it over."""
    from llmfeat.serving.state_store import SqliteState

    settings = with_online(lake, {"feast.online_store": "sqlite", "feast.repo_dir": str(tmp_path / "feast")})
    store = open_store(settings)
    state = OnlineState.open(settings, store)
    state.close()
    state.backend = SqliteState(store, checkpoint_s=0.01, restart_frames=64)
    at_us = int(offline(settings)["event_timestamp"].max().value // 1000) + 10**6
    for k in range(1500):
        user = str(1 + k % 20)
        assert state.push([Event(f"steady-{k}", user, str(1 + k % 40), k % 2, at_us + k)]).applied
    with sqlite3.connect(state.backend.path) as conn:  # frames in the log since it last started over
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames < 1000, f"the WAL holds {frames} frames after 1,500 pushes (about 6 each)"
    checkpointer = state.backend._checkpoints
    state.close()  # else its checkpointer copies the WAL back every round for as long as the process lives
    assert not checkpointer.is_alive()


def test_a_refresh_never_clobbers_a_newer_pushed_state(spark, store_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    state = OnlineState.open(store_settings, open_store(store_settings))
    rows = offline(store_settings)
    newest = rows.groupby("user_id").last()
    later = newest.loc["11", "newest_event_us"] + 3_600_000_000
    pushed = [Event("after-1", "11", "4", 1, later), Event("after-2", "11", "7", 0, later + 1)]
    state.push(pushed)  # user 11: offline state plus two events (pushed onto an empty online state first)
    published = materialize.run(spark, store_settings)  # what `llmfeat refresh` ends with
    assert {p.view for p in published} >= {state.views.user.name, state.views.item.name}
    got = state.read(state.views.user, "user_id", "11")
    assert got["event_count"] == 2  # the pushed state is newer than the batch's: kept
    # the batch state of a user nobody pushed to is there
    assert_same(state.read(state.views.user, "user_id", "12"), newest.loc["12"])
    # after the refresh, events pushed on top of the offline state continue it
    state.push([Event("after-3", "12", "4", 1, newest.loc["12", "newest_event_us"] + 5)])
    expected = from_row(newest.loc["12"].to_dict())
    vector = np.asarray(
        RustDelta(store_settings.delta_root).read_arrow("feast_item_marc_v1").to_pandas()
        .set_index("item_id").loc["4", "item_vector"]
    )  # fmt: skip
    expected = update(
        expected, newest.loc["12", "newest_event_us"] + 5, np.array([1]), vector[None], state.cfg
    )
    got = state.read(state.views.user, "user_id", "12")
    assert got["event_count"] == expected.event_count
    np.testing.assert_allclose(got["liked_mean"], expected.means()[0], rtol=1e-5, atol=1e-6)


def test_an_event_that_is_not_one_is_named() -> None:
    from llmfeat.serving.state_store import EventError

    with pytest.raises(EventError, match="label must be 0 or 1"):
        Event.parse({"event_id": "e", "user_id": "1", "item_id": "2", "label": 3})
    with pytest.raises(EventError, match="event_timestamp 'yesterday'"):
        Event.parse(
            {"event_id": "e", "user_id": "1", "item_id": "2", "label": 1, "event_timestamp": "yesterday"}
        )
    at = Event.parse(
        {
            "event_id": "e",
            "user_id": 1,
            "item_id": "2",
            "label": 1,
            "event_timestamp": "2001-01-01T00:00:00.5",
        }
    )
    assert at.at_us == 978307200_500000 and at.user_id == "1"
    assert lake_settings  # the same lake helpers as the CTR tests


def test_push_file_applies_once_and_logs_for_the_batch_job(spark, lake: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from llmfeat.reprs import EVENTS_TABLE
    from llmfeat.spark_jobs import push

    settings = with_online(lake, {"feast.online_store": "sqlite", "feast.repo_dir": str(tmp_path / "feast")})
    last = events_of(settings, "20")[-1].at_us / 1e6
    lines = [
        {"event_id": "p1", "user_id": "20", "item_id": "3", "label": 1, "event_timestamp": last + 60},
        {"event_id": "p2", "user_id": "20", "item_id": "8", "label": 0, "event_timestamp": last + 120},
        {"event_id": "p3", "user_id": "21", "item_id": "8", "label": 1, "event_timestamp": last},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    first = push.run(None, settings, path)
    assert sorted(first.result.applied) == ["p1", "p2", "p3"]
    again = push.run(None, settings, path)
    assert sorted(again.result.duplicates) == ["p1", "p2", "p3"] and not again.result.applied
    logged = RustDelta(settings.delta_root).read_arrow(EVENTS_TABLE).to_pandas()
    assert sorted(logged["event_id"]) == ["p1", "p2", "p3"]  # once, though pushed twice
    # the next batch run includes them: user 20's newest state holds the two pushed events
    summary = user_state.run(spark, settings)
    assert summary.pushed == 3
    rows = offline(settings)
    newest = rows[rows["user_id"] == "20"].iloc[-1]
    assert newest["newest_event_us"] == int((last + 120) * 1e6)
    assert newest["event_count"] == len(events_of(settings, "20")) + 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "label": "yes"}) + "\n")
    with pytest.raises(push.EventError, match=r"bad.jsonl, line 2: .*label must be 0 or 1"):
        push.run(None, settings, bad)
    late = [{**lines[0], "event_id": "q1"}, {**lines[2], "event_id": "q2"}, {**lines[0], "event_id": "q3",
            "event_timestamp": last - 60}]  # fmt: skip
    bad.write_text("".join(json.dumps(x) + "\n" for x in late))
    with pytest.raises(push.EventError, match=r"line 3: event 'q3' of user 20 is older than .* line 1"):
        push.run(None, settings, bad, chunk=2)  # q3 would come after q1, a chunk later
    in_one = push.run(None, settings, bad, chunk=3).result  # one chunk: sorted by time, then applied
    assert {"q1", "q3"} <= set(in_one.refused)  # older than the state p2 left, as the event path refuses


def test_the_service_turns_a_new_user_warm_with_a_model_trained_on_fresh_features(
    spark,
    lake: Settings,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A challenger trained on the fresh service; a user never seen is cold on /rank until POST /events."""
    from test_serving_ranking import in_thread

    from llmfeat.cli.ctr_commands import train_models
    from llmfeat.cli.demo import FRESH_SERVICE, post, warm_user
    from llmfeat.serving.ranking_service import build_app

    settings = with_online(lake, {"feast.online_store": "sqlite", "feast.repo_dir": str(tmp_path / "feast"),
                                  "ctr.llm_feature_service": FRESH_SERVICE,
                                  "serving.log_dir": str(tmp_path / "log")})  # fmt: skip
    materialize.run(spark, settings)  # the daily views and the state online
    train_models(settings, True, True, None)  # the challenger reads ctr_fresh_marc_v1
    items = [str(i) for i in range(1, 9)]
    with in_thread(build_app(settings)) as url:
        lines = warm_user(settings, url, items)
        assert "cold_user=True" in lines[0] and "user_state_item_marc_v1_fv" in lines[0]
        assert "cold_user=False, missing_user_views=['user_stats_fv']" in lines[4]  # no daily row yet
        old = {"event_id": "old", "user_id": lines[0].split()[2], "item_id": "1", "label": 1,
               "event_timestamp": "2001-01-01T00:00:00"}  # fmt: skip
        with pytest.raises(Exception, match="409"):
            post(url, "/events", old)


def test_the_replay_reads_only_the_past_and_refuses_a_planted_future_value(
    spark,
    lake: Settings,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """`abtest run` on the tiny lake: the fresh pair interleaved over 3 test days in event order, every read
    strictly before its request, nothing written outside the workspace; then a value stamped after the
    first request, planted in a new workspace, stops the replay naming it."""
    import mlflow
    from test_serving_ranking import in_thread

    from llmfeat.cli.ctr_commands import train_models
    from llmfeat.cli.demo import FRESH_ID_SERVICE, FRESH_SERVICE
    from llmfeat.registry import tracking_uri
    from llmfeat.serving.ranking_service import build_app
    from llmfeat.serving.replay import FutureRead, replay_timeline
    from llmfeat.spark_jobs import abtest_replay

    settings = with_online(lake, {"feast.online_store": "sqlite", "feast.repo_dir": str(tmp_path / "feast"),
                                  "ctr.llm_feature_service": FRESH_SERVICE, "ctr.kind": "lightgbm",
                                  "ctr.id_feature_service": FRESH_ID_SERVICE})  # fmt: skip
    materialize.run(spark, settings)
    train_models(settings, True, True, None)
    tables = RustDelta(settings.delta_root)
    pushed = tables.version("pushed_events")
    online = (tmp_path / "feast" / "online.db").stat().st_mtime_ns

    result = abtest_replay.run(None, settings, days=3)
    summary = result.summary
    test = offline_test_days(settings, 3)
    assert summary.events_applied == len(test) and not summary.events_refused
    assert len(summary.replayed) >= 3 and summary.boundaries == 2
    assert all(ts < r.request.at_us for r in summary.replayed for ts in r.read_ts.values())
    arms = ["champion", "challenger", "weakened", "no-information"]
    assert all(set(r.rankings) == set(arms) for r in summary.replayed)
    assert [c.b for c in result.comparisons] == arms
    client = mlflow.MlflowClient(tracking_uri(settings))
    assert "weakened" not in client.get_registered_model(settings.ctr.registry_name).aliases  # the copy's
    assert tables.version("pushed_events") == pushed  # events went to the workspace's table
    assert (tmp_path / "feast" / "online.db").stat().st_mtime_ns == online
    tags = client.get_run(result.live.run_id).data.tags
    assert tags["abtest.experiment"] == "interleave"
    assert f"abtest.champion_train_run.v{tags['abtest.champion_versions']}" in tags

    ws = abtest_replay.prepare(settings, days=3)
    first = ws.timeline.requests[0]
    item = next(iter(first.labels))
    stamp = pd.Timestamp(first.at_us + 1, unit="us", tz="UTC")  # 1 microsecond after the first request
    planted = pd.DataFrame(
        {"item_id": [item], "item_impressions": [99], "item_clicks": [99], "event_timestamp": [stamp]}
    )
    ws.store.write_to_online_store("item_stats_fv", planted)
    with in_thread(build_app(ws.settings)) as url, pytest.raises(FutureRead, match="item_stats_fv"):
        replay_timeline(url, ws.timeline, ws.at_midnight, progress=False)


def offline_test_days(settings: Settings, days: int) -> pd.DataFrame:
    inter = RustDelta(settings.delta_root).read_arrow("interactions").to_pandas()
    test = inter[inter["split"] == "test"]
    first = test["event_timestamp"].min().floor("D")
    return test[test["event_timestamp"] < first + pd.Timedelta(days=days)]
