"""The ranking service on real uvicorn (127.0.0.1, a free port) over the tiny lake: ranking, arms, cold start,
bad input, failed reloads, the event log; and the replayed A/B end to end through `llmfeat serve` in a child
process."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pytest
import uvicorn
from test_ctr_lake import build_lake, fresh_copy, no_open_run, train_both  # noqa: F401

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import open_store
from llmfeat.models.evaluation.interleaving import team_draft
from llmfeat.registry import ModelNotFound, tracking_uri
from llmfeat.serving.arms import ServingModels, assign_arm, registry_loader
from llmfeat.serving.event_log import EventLog, read_events
from llmfeat.serving.ranking_service import build_app, create_app
from llmfeat.serving.replay import free_port, held_out_requests, replay, running_service, wait_ready
from llmfeat.spark_jobs.abtest import analyze, interleaved

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = build_lake(tmp_path_factory.mktemp("serving"))
    train_both(settings)
    return settings


class Flaky:
    """The registry loader, made to fail on demand (a model store outage during a reload)."""

    def __init__(self, settings: Settings):
        self.load, self.broken = registry_loader(settings), False

    def __call__(self, alias: str, version: str | None = None) -> Any:
        if self.broken:
            raise OSError("model store unreachable")
        return self.load(alias, version)


@contextmanager
def in_thread(app: Any) -> Iterator[str]:
    """An ASGI app on a real uvicorn server in a thread on 127.0.0.1; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serving_models(settings: Settings, loader: Any) -> ServingModels:
    aliases = {"champion": "champion", "challenger": "challenger"}
    models = ServingModels(aliases, loader, open_store(settings), settings.feast.online_store)
    models.load()
    return models


@pytest.fixture
def service(lake: Settings, tmp_path: Path) -> Iterator[tuple[str, Flaky, EventLog]]:
    """create_app on a real uvicorn server in a thread; yields (url, loader, event log)."""
    settings = fresh_copy(lake, tmp_path)
    loader = Flaky(settings)
    events = EventLog(tmp_path / "events", flush_every=5, flush_interval_s=0.2)
    with in_thread(create_app(settings.serving, serving_models(settings, loader), events)) as url:
        yield url, loader, events


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_rank_returns_sorted_items_and_logs_only_the_shown_ones(service: tuple[str, Flaky, EventLog]) -> None:
    url, _, events = service
    status, reply = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2", "3", "4", "5"]})
    assert status == 200 and sorted(i["item_id"] for i in reply["items"]) == ["1", "2", "3", "4", "5"]
    scores = [i["score"] for i in reply["items"]]
    assert scores == sorted(scores, reverse=True) and [i["rank"] for i in reply["items"]] == [0, 1, 2, 3, 4]
    assert reply["arm"] == assign_arm("3", Settings().serving) and reply["model_version"] in ("1", "2")
    assert reply["shown"] == Settings().serving.slots == 3
    assert not reply["cold_user"] and not reply["cold_items"]
    again = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2"]})[1]
    assert again["arm"] == reply["arm"] and again["shown"] == 2  # stable per user; fewer than the slots
    top = reply["items"][0]["item_id"]
    assert call(url, "/click", {"request_id": reply["request_id"], "item_id": top})[0] == 204
    events.close()
    logged = list(read_events(events.folder))
    assert [e["type"] for e in logged] == ["impression", "impression", "click"]
    assert logged[0]["request_id"] == reply["request_id"] == logged[2]["request_id"]
    assert logged[0]["items"] == [i["item_id"] for i in reply["items"][:3]]  # the shown items, best first
    assert logged[0]["scores"] == [round(i["score"], 6) for i in reply["items"][:3]]
    assert logged[0]["model_version"] == reply["model_version"]
    assert logged[1]["items"] == [i["item_id"] for i in again["items"]]


def test_interleaving_drafts_both_rankings_and_credits_clicks_per_team(
    lake: Settings, tmp_path: Path
) -> None:
    settings = fresh_copy(lake, tmp_path, "serving.experiment=interleave", "serving.shadow_aliases=[champ2]")
    uri = tracking_uri(settings)
    mlflow.MlflowClient(uri, uri).set_registered_model_alias("llmfeat-ctr", "champ2", "1")
    events = EventLog(tmp_path / "events", flush_every=5, flush_interval_s=0.2)
    aliases = {"champion": "champion", "challenger": "challenger", "champ2": "champ2"}
    models = ServingModels(aliases, registry_loader(settings), open_store(settings), "sqlite")
    models.load()
    items = [str(i) for i in range(1, 11)]
    with in_thread(create_app(settings.serving, models, events)) as url:
        body = {"user_id": "3", "item_ids": items, "request_time": "2001-03-01T00:00:00"}
        replies = [call(url, "/rank", body | {"request_id": f"r{k}"})[1] for k in range(8)]
        for r in replies:
            drafted = team_draft(
                r["rankings"]["champion"], r["rankings"]["challenger"], 3, r["first"] == "champion"
            )
            assert [i["item_id"] for i in r["items"]] == drafted[0] and r["shown"] == 3
            assert [i["team"] for i in r["items"]] == [("champion", "challenger")[t] for t in drafted[1]]
            assert r["rankings"]["champ2"] == r["rankings"]["champion"]  # the shadow: same model, never shown
            assert r["versions"] == {"champion": "1", "challenger": "2"} and r["read_ts"]
        assert {r["first"] for r in replies} == {"champion", "challenger"}  # the coin, by request id
        for r in replies:
            call(url, "/click", {"request_id": r["request_id"], "item_id": r["items"][1]["item_id"]})
        assert call(url, "/rank", {"user_id": "3", "item_ids": items, "request_time": "soon"})[0] == 400
    events.close()
    found = interleaved(list(read_events(events.folder)), 3, 50, 0)
    assert found is not None and found.result.requests == 8 and sum(found.result.credits) == 8
    second = sum(r["items"][1]["team"] == "challenger" for r in replies)
    assert found.result.credits == (8 - second, second)  # each click credited to its slot's team


def test_cold_users_and_items_are_ranked_with_the_fallback_and_flagged(
    service: tuple[str, Flaky, EventLog],
) -> None:
    url, _, events = service
    users = [f"new-{k}" for k in range(12)]  # unknown to the online store, in both arms
    replies = [call(url, "/rank", {"user_id": u, "item_ids": ["1", "999", "2"]})[1] for u in users]
    assert {r["arm"] for r in replies} == {"champion", "challenger"}
    for r in replies:
        assert r["cold_user"] is True and r["cold_items"] == ["999"] and len(r["items"]) == 3
        assert all(0 < i["score"] < 1 for i in r["items"])
    warm = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2"]})[1]
    assert warm["cold_user"] is False and warm["cold_items"] == []
    events.close()
    logged = [e for e in read_events(events.folder) if e["user_id"] in users]
    assert len(logged) == 12
    assert all(e["cold_user"] and set(e["cold_items"]) == {"999"} & set(e["items"]) for e in logged)


def test_bad_requests_get_4xx_with_the_reason(service: tuple[str, Flaky, EventLog]) -> None:
    url, _, _ = service
    status, body = call(url, "/rank", {"user_id": "3", "item_ids": []})
    assert status == 400 and "empty" in body["detail"]
    status, body = call(url, "/rank", {"user_id": "3", "item_ids": [str(i) for i in range(1001)]})
    assert status == 400 and "at most 1000" in body["detail"]
    assert call(url, "/rank", {"user_id": "3", "item_ids": ["1", "1"]})[0] == 400
    assert call(url, "/rank", {"user": "3"})[0] == 422
    assert call(url, "/rank", {"user_id": "3", "item_ids": [1, 2]})[0] == 422  # ids are strings
    assert call(url, "/rank", {"user_id": "3", "item_ids": "1"})[0] == 422


def test_failed_reload_keeps_the_last_good_models(service: tuple[str, Flaky, EventLog]) -> None:
    url, loader, _ = service
    before = call(url, "/health")[1]["models"]
    loader.broken = True
    status, body = call(url, "/admin/reload", {})
    assert status == 200 and body["reloaded"] is False and "unreachable" in body["reload_errors"]["champion"]
    assert body["models"] == before
    assert call(url, "/rank", {"user_id": "5", "item_ids": ["1", "2"]})[0] == 200  # still serving
    assert "unreachable" in call(url, "/health")[1]["reload_errors"]["challenger"]
    loader.broken = False
    assert call(url, "/admin/reload", {})[1]["reloaded"] is True


def test_missing_alias_stops_the_start(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path, "serving.challenger_alias=nope")
    with pytest.raises(ModelNotFound, match="llmfeat-ctr@nope"):
        build_app(settings)


def test_event_log_batches_lines_into_few_segments(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_every=3, flush_interval_s=3600, segment_bytes=30)  # 9 bytes a line
    log.append({"n": 1}, {"n": 2})
    assert log.pending == 2 and not list(read_events(tmp_path))  # buffered, nothing written yet
    log.append({"n": 3})  # a full batch wakes the writer
    deadline = time.monotonic() + 30
    while log.written < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2, 3]  # readable in the open segment
    assert not list(tmp_path.glob("events-*.jsonl"))  # still open: no closed segment yet
    log.append({"n": 4})
    assert log.flush() == 1  # the segment passed segment_bytes: closed and renamed
    log.append({"n": 5})
    log.close()
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2, 3, 4, 5]
    assert len(list(tmp_path.glob("events-*.jsonl"))) == 2 and not list(tmp_path.glob(".*.open"))
    (tmp_path / ".events-9-9-000001.jsonl.open").write_text('{"n": 6}\n{"n": 7')  # a crash mid-write
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2, 3, 4, 5, 6]  # the torn line is skipped
    assert [e["n"] for e in read_events(tmp_path, include_open=False)] == [1, 2, 3, 4, 5]


def test_event_log_drops_beyond_max_pending_and_counts(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_every=100, flush_interval_s=3600, max_pending=3)
    log.append({"n": 1}, {"n": 2})
    log.append({"n": 3}, {"n": 4})
    assert log.pending == 3 and log.dropped == 1
    log.close()
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2, 3]


def test_replayed_ab_through_llmfeat_serve(lake: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "events"
    settings = fresh_copy(lake, tmp_path, f"serving.log_dir={folder}")
    requests = held_out_requests(RustDelta(settings.delta_root), 30, 5, seed=0)
    assert all(2 <= len(r.item_ids) <= 5 for r in requests)
    with running_service(settings) as url:
        assert wait_ready(url, proc=_Alive())["models"]["champion"]["alias"] == "champion"
        summary = replay(url, requests, workers=2)
    assert summary.ranked == 30 and not summary.errors
    result = analyze(settings, folder)
    shown = sum(min(settings.serving.slots, len(r.item_ids)) for r in requests)
    assert result.per_arm["requests"].sum() == 30 and result.per_arm["impressions"].sum() == shown
    assert result.per_arm["clicks"].sum() == summary.clicks
    run = mlflow.MlflowClient(tracking_uri(settings)).get_run(result.run_id)
    assert run.data.tags["abtest.champion_versions"] == "1" and "ctr_lift_low" in run.data.metrics
    assert "abtest.champion_train_run.v1" in run.data.tags


class _Alive:
    """wait_ready's process argument for a server known to be running."""

    returncode = None

    def poll(self) -> None:
        return None
