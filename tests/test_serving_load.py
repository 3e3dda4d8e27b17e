"""The ranking service under load, with several workers and on Redis, over the tiny lake (no timing asserted):
overload is answered 503 + Retry-After and normal service returns after it; workers serve the versions the
parent pinned and follow a reload made in any one of them; Redis serves what SQLite serves."""

from __future__ import annotations

import http.client
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from test_ctr_lake import build_lake, fresh_copy, lake_settings, no_open_run, train_both  # noqa: F401
from test_serving_ranking import call, in_thread, serving_models

from llmfeat.config import CtrConf, Settings
from llmfeat.feast_repo import apply_repo, open_store
from llmfeat.registry import tracking_uri
from llmfeat.serving.arms import assign_arm, registry_loader
from llmfeat.serving.event_log import EventLog
from llmfeat.serving.features import service_fields
from llmfeat.serving.local_servers import redis_server
from llmfeat.serving.online_read import FeastRows, rows_reader
from llmfeat.serving.ranking_service import RankRequest, create_app, rank
from llmfeat.serving.replay import running_service
from llmfeat.spark_jobs import materialize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = build_lake(tmp_path_factory.mktemp("serving_load"))
    train_both(settings)
    return settings


class Slow:
    """A ranker that takes `delay_s` per request once `on` (a stand-in for a worker saturated by work)."""

    def __init__(self, ranker: Any):
        self.ranker, self.on, self.delay_s = ranker, False, 0.2

    def score(self, frame: Any) -> Any:
        return self.ranker.score(frame)

    def score_arrays(self, columns: Any) -> Any:
        if self.on:
            time.sleep(self.delay_s)  # blocks the event loop, as CPU-bound scoring does
        return self.ranker.score_arrays(columns)


def test_overload_gets_503_with_retry_after_then_service_resumes(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path, "serving.max_inflight=2", "serving.max_wait_ms=50")
    slow: list[Slow] = []
    load = registry_loader(settings)

    def loader(alias: str, version: str | None = None) -> Any:
        ref, ranker = load(alias, version)
        slow.append(Slow(ranker))
        return ref, slow[-1]

    events = EventLog(tmp_path / "events")
    app = create_app(settings.serving, serving_models(settings, loader), events)
    body = {"user_id": "3", "item_ids": ["1", "2", "3"]}
    with in_thread(app) as url:
        assert call(url, "/rank", body)[0] == 200
        for s in slow:
            s.on = True
        start = threading.Barrier(16)
        answers: list[tuple[int, str | None]] = []

        def client() -> None:  # a keep-alive connection, as a calling service's pool holds them
            conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=120)
            conn.request("GET", "/health")
            conn.getresponse().read()
            start.wait()  # all 16 at once, while the worker is busy
            conn.request("POST", "/rank", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            answers.append((resp.status, resp.getheader("Retry-After")))
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = [s for s, _ in answers]
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1 and set(statuses) <= {200, 503}
        assert all(retry == "1" for s, retry in answers if s == 503)  # Retry-After: 1
        shed = call(url, "/health")[1]["shed"]
        assert shed["inflight"] + shed["waited"] == statuses.count(503)
        for s in slow:  # the load drops
            s.on = False
        assert [call(url, "/rank", body)[0] for _ in range(5)] == [200] * 5
        assert call(url, "/health")[1]["shed"] == shed  # nothing shed since


def test_workers_serve_the_pinned_versions_and_follow_a_reload(lake: Settings, tmp_path: Path) -> None:
    settings = fresh_copy(lake, tmp_path, "serving.workers=2", "serving.pin_check_s=0.2")
    uri, name = tracking_uri(settings), settings.ctr.registry_name
    client = mlflow.MlflowClient(uri, uri)
    pinned = {a: str(client.get_model_version_by_alias(name, a).version) for a in ("champion", "challenger")}
    with running_service(settings) as url:
        workers = health_by_worker(url, until=lambda seen: len(seen) == 2)
        assert len(workers) == 2, "two worker processes answer"
        port = int(url.rsplit(":", 1)[1])
        pool = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(16)]
        for conn in pool:  # a caller's pool, opened at once: its connections spread over the workers
            conn.request("GET", "/health")
        assert len({json.loads(conn.getresponse().read())["worker"] for conn in pool}) == 2
        for conn in pool:
            conn.close()
        versions = {pid: h["models"]["challenger"]["version"] for pid, h in workers.items()}
        assert set(versions.values()) == {pinned["challenger"]}
        users = [str(u) for u in range(1, 25)]
        replies = [call(url, "/rank", {"user_id": u, "item_ids": ["1", "2"]})[1] for u in users]
        assert [r["arm"] for r in replies] == [assign_arm(u, settings.serving) for u in users]
        assert {(r["arm"], r["model_version"]) for r in replies} == set(pinned.items())

        moved_to = pinned["champion"]
        client.set_registered_model_alias(name, "challenger", moved_to)
        assert call(url, "/admin/reload", {})[1]["reloaded"] is True  # reaches one of the workers
        moved = health_by_worker(
            url, until=lambda seen: len(seen) == 2 and all(versions_of(h) == moved_to for h in seen.values())
        )
        assert len(moved) == 2 and all(versions_of(h) == moved_to for h in moved.values()), {
            pid: (h["models"], h["reload_errors"]) for pid, h in moved.items()
        }
    client.set_registered_model_alias(name, "challenger", pinned["challenger"])


def versions_of(health: dict) -> str:
    return str(health["models"]["challenger"]["version"])


def health_by_worker(url: str, until: Any, timeout_s: float = 120) -> dict[int, dict]:
    """/health over new connections (the kernel hands each to a worker) until `until(latest per worker)`."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(seen):
        health = call(url, "/health")[1]
        seen[health["worker"]] = health
        time.sleep(0.02)
    return seen


def same_rows_as_feast(settings: Settings) -> None:
    """The direct reader gives, field by field, the bytes Feast's own online_read gives (None if unknown), for
    every view of the LLM model's feature service."""
    store = open_store(settings)
    ids = {"user_id": ["3", "nobody", "1"], "item_id": ["2", "999", "1"]}
    views: dict[str, tuple[Any, str, list[str]]] = {}
    for f in service_fields(store, CtrConf().llm_feature_service):
        views.setdefault(f.view.name, (f.view, f.key, []))[2].append(f.name)
    requests = [(view, fields, key, ids[key]) for view, key, fields in views.values()]
    reader = rows_reader(store, settings.feast.online_store)
    got, feast = reader.read_fields(requests), FeastRows(store).read_fields(requests)
    assert got == feast and len(got) >= 4
    assert all(rows[f][1] is None and rows[f][0] is not None for rows in got for f in rows)


def on_redis(lake: Settings, tmp: Path, conn: str) -> Settings:
    """The lake's tables, models and registry (copied) with the online features materialized into Redis."""
    data = tmp / "data"
    (data / "feast").mkdir(parents=True)
    (data / "delta").symlink_to(Path(lake.data_dir) / "delta")
    shutil.copy(Path(lake.data_dir) / "feast" / "registry.db", data / "feast" / "registry.db")
    if (Path(lake.data_dir) / "mlflow" / "mlflow.db").exists():  # (not if $MLFLOW_TRACKING_URI is elsewhere)
        (data / "mlflow").mkdir()
        shutil.copy(Path(lake.data_dir) / "mlflow" / "mlflow.db", data / "mlflow" / "mlflow.db")
    settings = lake_settings(data, "feast.online_store=redis", f"feast.redis={conn}")
    store = apply_repo(settings)
    views = [v.name for v in store.list_feature_views() if v.materialization_intervals]
    materialize.materialize(store, views, full=True)
    return settings


def test_redis_online_store_ranks_like_sqlite(lake: Settings, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server, or make system-deps)")
    requests = [
        RankRequest(user_id=u, item_ids=["1", "2", "3", "999", "7"]) for u in ["1", "2", "3", "30", "new"]
    ]
    (tmp_path / "sqlite").mkdir()
    sqlite = fresh_copy(lake, tmp_path / "sqlite")
    expected = [rank(r, sqlite.serving, serving_models(sqlite, registry_loader(sqlite)))[0] for r in requests]
    with redis_server() as conn:
        redis = on_redis(lake, tmp_path / "redis", conn)
        models = serving_models(redis, registry_loader(redis))
        for settings in (sqlite, redis):
            same_rows_as_feast(settings)
        assert type(models.get("challenger").features._rows).__name__ == "RedisRows"
        got = [rank(r, redis.serving, models)[0] for r in requests]
    for a, b in zip(expected, got, strict=True):
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]])
        assert (a["cold_user"], a["cold_items"]) == (b["cold_user"], b["cold_items"])
    assert got[-1]["cold_user"] and got[0]["cold_items"] == ["999"]


def test_sqlite_reads_are_remembered_until_the_store_changes(lake: Settings, tmp_path: Path) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    from llmfeat.serving.online_read import entity_key

    data = tmp_path / "data"  # the lake's registry and online store, copied: this test writes to it
    shutil.copytree(Path(lake.data_dir) / "feast", data / "feast")
    (data / "delta").symlink_to(Path(lake.data_dir) / "delta")
    store = open_store(lake_settings(data))
    fields = service_fields(store, CtrConf().llm_feature_service)
    field = next(f for f in fields if f.key == "item_id" and not f.dim)  # a scalar item field
    reader = rows_reader(store, "sqlite")
    request = [(field.view, [field.name], "item_id", ["1", "nobody"])]
    before = reader.read_fields(request)[0][field.name]
    assert before[0] is not None and before[1] is None
    remembered = reader._entries
    assert reader.read_fields(request)[0][field.name] == before and reader._entries == remembered  # no SELECT
    table = reader.table(field.view)
    version = store.config.entity_key_serialization_version
    changed = (Value(string_val="Changed") if field.text else Value(int64_val=1234)).SerializeToString()
    with sqlite3.connect(data / "feast" / "online.db") as other:  # another writer, as a materialization is
        other.execute(
            f"UPDATE {table} SET value = ? WHERE entity_key = ? AND feature_name = ?",
            [changed, entity_key("item_id", "1", version), field.name],
        )
        other.execute(
            f"INSERT INTO {table} (entity_key, feature_name, value) VALUES (?, ?, ?)",
            [entity_key("item_id", "nobody", version), field.name, changed],
        )
    assert reader.read_fields(request)[0][field.name] == [changed, changed]
    # a write to one key forgets that key only: the other candidates' rows stay remembered
    two = [(field.view, [field.name], "item_id", ["1", "2"])]
    reader.read_fields(two)
    key_2 = entity_key("item_id", "2", version)
    remembered_2 = reader._known[(table, field.name)][key_2]
    again = (Value(string_val="Again") if field.text else Value(int64_val=5678)).SerializeToString()
    with sqlite3.connect(data / "feast" / "online.db") as other:
        other.execute(
            f"UPDATE {table} SET value = ? WHERE entity_key = ? AND feature_name = ?",
            [again, entity_key("item_id", "1", version), field.name],
        )
    assert reader.read_fields(two)[0][field.name] == [again, remembered_2]
    assert reader._known[(table, field.name)][key_2] is remembered_2  # not read again
    # a write to another table (a pushed event writes the state tables) leaves this table remembered
    with sqlite3.connect(data / "feast" / "online.db") as other:
        other.execute("CREATE TABLE IF NOT EXISTS elsewhere (x INTEGER)")
        other.execute("INSERT INTO elsewhere VALUES (1)")
    user_field = next(f for f in fields if f.key == "user_id")
    other_table = reader.table(user_field.view)
    reader.read_fields([(user_field.view, [user_field.name], "user_id", ["1"])])  # watched from now on
    cached = reader._known[(table, field.name)]
    with sqlite3.connect(data / "feast" / "online.db") as other:
        gone = [entity_key("user_id", "1", version)]
        other.execute(f"DELETE FROM {other_table} WHERE entity_key = ?", gone)
    assert reader.read_fields(request)[0][field.name] == [again, changed]
    assert reader._known[(table, field.name)] is cached  # not forgotten, not read again
    user_rows = reader.read_fields([(user_field.view, [user_field.name], "user_id", ["1"])])
    assert user_rows[0][user_field.name] == [None]  # that table's rows were forgotten and read again
