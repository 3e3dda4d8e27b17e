"""The ranking service on real uvicorn (127.0.0.1, a free port) over the tiny lake: ranking, arms, bad input,
failed reloads, the event log; and the replayed A/B end to end through `llmfeat serve` in a child process."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import uvicorn
from test_ctr_lake import build_lake, fresh_copy, no_open_run, train_both  # noqa: F401

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import open_store
from llmfeat.registry import ModelNotFound, tracking_uri
from llmfeat.serving.event_log import EventLog, read_events
from llmfeat.serving.ranking_service import (
    CandidateFeatures,
    ServingModels,
    assign_arm,
    build_app,
    create_app,
    registry_loader,
)
from llmfeat.serving.replay import free_port, held_out_requests, replay, running_service, wait_ready
from llmfeat.spark_jobs.abtest import analyze

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

    def __call__(self, alias: str) -> Any:
        if self.broken:
            raise OSError("model store unreachable")
        return self.load(alias)


@pytest.fixture
def service(lake: Settings, tmp_path: Path) -> Iterator[tuple[str, Flaky, EventLog]]:
    """create_app on a real uvicorn server in a thread; yields (url, loader, event log)."""
    settings = fresh_copy(lake, tmp_path)
    loader = Flaky(settings)
    models = ServingModels({"champion": "champion", "challenger": "challenger"}, loader)
    models.load()
    events = EventLog(tmp_path / "events", flush_every=5, flush_interval_s=0.2)
    app = create_app(settings.serving, models, CandidateFeatures(open_store(settings)), events)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url, loader, events
    server.should_exit = True
    thread.join(timeout=10)


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_rank_returns_sorted_items_with_the_arm_model_version(service: tuple[str, Flaky, EventLog]) -> None:
    url, _, events = service
    status, reply = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2", "3", "4"]})
    assert status == 200 and sorted(i["item_id"] for i in reply["items"]) == ["1", "2", "3", "4"]
    scores = [i["score"] for i in reply["items"]]
    assert scores == sorted(scores, reverse=True) and [i["rank"] for i in reply["items"]] == [0, 1, 2, 3]
    assert reply["arm"] == assign_arm("3", Settings().serving) and reply["model_version"] in ("1", "2")
    again = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "2"]})[1]
    assert again["arm"] == reply["arm"]  # stable per user
    assert call(url, "/click", {"request_id": reply["request_id"], "item_id": "1"})[0] == 204
    events.flush()
    logged = list(read_events(events.folder))
    assert sum(e["type"] == "impression" for e in logged) == 6 and logged[-1]["type"] == "click"


def test_bad_requests_get_4xx_with_the_reason(service: tuple[str, Flaky, EventLog]) -> None:
    url, _, _ = service
    status, body = call(url, "/rank", {"user_id": "3", "item_ids": []})
    assert status == 400 and "empty" in body["detail"]
    status, body = call(url, "/rank", {"user_id": "3", "item_ids": [str(i) for i in range(501)]})
    assert status == 400 and "at most 500" in body["detail"]
    assert call(url, "/rank", {"user_id": "3", "item_ids": ["1", "1"]})[0] == 400
    status, body = call(url, "/rank", {"user_id": "nobody", "item_ids": ["1"]})
    assert status == 404 and "user 'nobody'" in body["detail"]
    status, body = call(url, "/rank", {"user_id": "3", "item_ids": ["1", "999"]})
    assert status == 404 and "999" in body["detail"]
    assert call(url, "/rank", {"user": "3"})[0] == 422


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


def test_event_log_writes_whole_batches_only(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_every=3, flush_interval_s=60)
    log.append({"n": 1}, {"n": 2})
    assert not list(tmp_path.glob("events-*.jsonl")) and log.pending == 2
    log.append({"n": 3})  # batch full: one file
    (tmp_path / ".events-x.jsonl.tmp").write_text('{"n": 99')  # a crash mid-write leaves only a temp file
    log.append({"n": 4})
    log.close()  # flushes the rest
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2, 3, 4]
    assert len(list(tmp_path.glob("events-*.jsonl"))) == 2


def test_replayed_ab_through_llmfeat_serve(lake: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "events"
    settings = fresh_copy(lake, tmp_path, f"serving.log_dir={folder}")
    requests = held_out_requests(RustDelta(settings.delta_root), 30, 5, seed=0)
    assert all(2 <= len(r.item_ids) <= 5 for r in requests)
    with running_service(settings) as url:
        assert wait_ready(url, proc=_Alive())["models"]["champion"]["alias"] == "champion"
        summary = replay(url, requests, slots=settings.abtest.slots, workers=2)
    assert summary.ranked == 30 and not summary.errors
    result = analyze(settings, folder)
    shown = sum(min(settings.abtest.slots, len(r.item_ids)) for r in requests)
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
