"""The fresh-state event path: a pushed event's latency, and /rank while events arrive (results:
docs/benchmarks.md, "Fresh state: pushed events").

    .venv/bin/python bench/event_push.py [--data-dir DIR] [--store sqlite redis] [--events 3000]
        [--push-rate 200] [--push-seconds 15] [--rank-rate 200] [--event-rate 200] [--seconds 120]
        [--http-only] [--set KEY=VALUE ...] [--json out.json]

What runs:
1. The lake of bench/serving_load.py (MovieLens-100k sized: 943 users, 1,682 items, 100,000 interactions;
   champion `ctr_id_v2`), plus, once per --data-dir: the state job (spark_jobs/user_state.py,
   `state.item_version=1`, local[2]) and materialization, which put every user's and item's newest state
   online; then a ranker on the fresh feature service (`ctr_fresh_marc_v1`: ids, fresh counters, the user
   state and the candidate's cosines with the liked and disliked means) is trained and registered as the
   challenger, so that half the users' /rank requests read the state the events write.
2. In-process (unless --http-only): `OnlineState.push([event])` (serving/state_store.py), one event at a time
   (closed loop), --events events after 200 warm-up ones, latency = the call; and the service's `rank()` and
   each arm's feature fetch, with the rows remembered and with a pushed event before each call.
3. Over HTTP: `llmfeat serve` (serving.workers=0: 2 processes on 2 cores; --set adds service settings, for
   diagnostics) in a child process; POST /events open loop at --push-rate for --push-seconds, one event per
   request. Then /rank alone at --rank-rate (1 user + 100 distinct candidates, uniform) for --seconds, then
   /rank at --rank-rate with POST /events at --event-rate beside it, for --seconds.
On SQLite and on a real redis-server (loopback, no persistence; the lake's features and state materialized
into it first).

Events: event ids unique per run; users in one random order, cycled (943 users: a user's next event comes
4.7 s later at 200/s, so no two workers race for one user); items and labels uniform; event_timestamp the
wall clock at the send (epoch seconds, microseconds), so every event is newer than the user's state and
applied (a refused one answers 409, counted). The load generator is a second process like
bench/serving_load.py's (one asyncio loop, raw HTTP/1.1 over kept-alive connections, request k of a stream
due at start + k / rate, latency from the due time, 5 s timeout) and shares the 2 cores with the service.
Reported per phase: sent, answers other than 200, p50 / p95 / p99 / max ms of the 200s, the service's CPU
(all its processes, and each of them), redis-server's, the load generator's, the whole machine's (anything
else running shows there), resident memory, load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import (  # noqa: E402  (the lake, the service, the sampler and the HTTP client)
    ITEMS,
    USERS,
    Pool,
    Sampler,
    bodies,
    exchange,
    lake_settings,
    materialize_all,
    prepare,
    redis_pid,
    run_loop,
    service,
)

STATE = ["state.item_version=1"]  # the lake's item vectors (no MARC alias is registered there)
FRESH_SERVICE = "ctr_fresh_marc_v1"


# -- the lake -----------------------------------------------------------------------------------------------


def prepare_state(data_dir: Path) -> None:
    """The state job and materialization, then the fresh ranker at the challenger alias; once per data_dir."""
    from llmfeat.cli.ctr_commands import train_models

    settings = lake_settings(data_dir, *STATE)
    state_done, ranker_done = data_dir / "bench-state.done", data_dir / f"bench-{FRESH_SERVICE}.done"
    if not state_done.exists():
        from llmfeat.session import build_session
        from llmfeat.spark_jobs import materialize, user_state

        started = time.monotonic()
        spark = build_session(settings.spark, settings.delta)
        try:
            print(user_state.run(spark, settings), flush=True)
            print(materialize.format_published(materialize.run(spark, settings)), flush=True)
        finally:
            spark.stop()
        state_done.write_text(f"state built and materialized in {time.monotonic() - started:.0f} s\n")
    if not ranker_done.exists():
        started = time.monotonic()
        fresh = lake_settings(data_dir, *STATE, f"ctr.llm_feature_service={FRESH_SERVICE}")
        for trained in train_models(fresh, llm=True, both=False, alias=settings.serving.challenger_alias):
            print(trained.summary(), flush=True)
        ranker_done.write_text(f"fresh ranker trained in {time.monotonic() - started:.0f} s\n")


# -- events -------------------------------------------------------------------------------------------------


class Events:
    """Event k of a run: unique id; users in one random order, cycled (a user's next event comes USERS events
    later, so two workers never hold two events of one user at once); uniform item and label."""

    def __init__(self, run: str, seed: int):
        self.run, self.rng = run, np.random.default_rng(seed)
        self.users = (self.rng.permutation(USERS) + 1).tolist()
        self.k = 0

    def next(self) -> dict[str, Any]:
        user = self.users[self.k % len(self.users)]
        self.k += 1
        return {
            "event_id": f"{self.run}-{self.k}",
            "user_id": str(user),
            "item_id": str(int(self.rng.integers(1, ITEMS + 1))),
            "label": int(self.rng.integers(0, 2)),
        }


def summary(latencies_ms: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies_ms or [np.nan])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"n": len(latencies_ms), "p50": p50, "p95": p95, "p99": p99, "max": float(np.max(lat))}


def in_process(settings: Any, n: int, warmup: int = 200) -> dict[str, Any]:
    """`OnlineState.push([event])` one event at a time: latency of each call."""
    from llmfeat.feast_repo import open_store
    from llmfeat.serving.state_store import Event, OnlineState

    state = OnlineState.open(settings, open_store(settings))
    events = Events(f"inproc-{uuid.uuid4().hex[:8]}", seed=11)
    latencies, outcome = [], {"applied": 0, "duplicates": 0, "refused": 0}
    cpu0 = time.process_time()
    busy0, wall0 = busy_cores()
    for k in range(warmup + n):
        raw = events.next()
        event = Event(raw["event_id"], raw["user_id"], raw["item_id"], raw["label"], time.time_ns() // 1000)
        started = time.perf_counter()
        result = state.push([event])
        took = (time.perf_counter() - started) * 1000
        if k >= warmup:
            latencies.append(took)
            outcome["applied"] += len(result.applied)
            outcome["duplicates"] += len(result.duplicates)
            outcome["refused"] += len(result.refused)
    busy1, now = busy_cores()
    wall = now - wall0
    state.close()  # its WAL checkpointer would otherwise run beside the service's in the HTTP phases
    return {**summary(latencies), **outcome, "cpu": (time.process_time() - cpu0) / wall, "wall_s": wall,
            "machine_cpu": (busy1 - busy0) / wall, "load1": os.getloadavg()[0]}  # fmt: skip


def rank_in_process(settings: Any, n: int = 1000) -> dict[str, Any]:
    """What a push does to the next ranking request in the same process: `rank()` of the service (features
    of the user's arm + scoring; 1 user + 100 candidates) and each arm's feature fetch alone, with the rows
    remembered (no write in between) and with a pushed event before each call (on SQLite the commit empties
    the reader's row memory: `PRAGMA data_version` moved)."""
    import torch

    from llmfeat.feast_repo import open_store
    from llmfeat.serving.arms import ServingModels, registry_loader
    from llmfeat.serving.ranking_service import RankRequest, rank
    from llmfeat.serving.state_store import Event, OnlineState

    torch.set_num_threads(1)  # as the service does
    store = open_store(settings)
    state = OnlineState.open(settings, store)
    cfg = settings.serving
    aliases = {"champion": cfg.champion_alias, "challenger": cfg.challenger_alias}
    models = ServingModels(aliases, registry_loader(settings), store, settings.feast.online_store)
    models.load()
    events = Events(f"rank-{uuid.uuid4().hex[:8]}", seed=13)
    requests = [RankRequest(**json.loads(b)) for b in bodies(100)]

    def timed(call: Any, push: bool) -> dict[str, float]:
        latencies = []
        for k in range(n + 100):
            if push:
                raw = events.next()
                at = time.time_ns() // 1000
                state.push([Event(raw["event_id"], raw["user_id"], raw["item_id"], raw["label"], at)])
            req = requests[k % len(requests)]
            started = time.perf_counter()
            call(req)
            if k >= 100:
                latencies.append((time.perf_counter() - started) * 1000)
        return summary(latencies)

    out: dict[str, Any] = {}
    for push in (False, True):
        tag = "after_push" if push else "remembered"
        out[f"rank_{tag}"] = timed(lambda r: rank(r, cfg, models), push)
        for arm in ("champion", "challenger"):
            fetch = models.get(arm).features.fetch
            out[f"fetch_{arm}_{tag}"] = timed(lambda r, f=fetch: f(r.user_id, r.item_ids), push)
    out["services"] = {arm: models.get(arm).ref.feature_service for arm in ("champion", "challenger")}
    state.close()
    return out


# -- the load generator (its own process) -------------------------------------------------------------------


def request_bytes(host: str, path: str, body: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (path.encode(), host.encode(), len(body)) + body


async def open_loop(
    host: str,
    port: int,
    streams: list[dict[str, Any]],
    seconds: float,
    connections: int = 128,
    pick: str = "lifo",
) -> dict[str, Any]:
    """Several open-loop streams at once over one pool: {"kind": "rank", "rate", "candidates"} or
    {"kind": "events", "rate", "run"}. Per stream: latencies by status from the due time, errors."""
    ranks = {s["candidates"]: [request_bytes(host, "/rank", b) for b in bodies(s["candidates"])]
             for s in streams if s["kind"] == "rank"}  # fmt: skip
    makers = {i: Events(s["run"], seed=100 + i) for i, s in enumerate(streams) if s["kind"] == "events"}
    pool = Pool(host, port, connections, pick)
    await pool.fill()
    out = [{"latencies_ms": {}, "errors": {}, "statuses": {}, "stale_retries": 0} for _ in streams]

    def request(i: int, k: int) -> bytes:
        s = streams[i]
        if s["kind"] == "rank":
            pack = ranks[s["candidates"]]
            return pack[k % len(pack)]
        event = makers[i].next() | {"event_timestamp": round(time.time(), 6)}
        return request_bytes(host, "/events", json.dumps(event).encode())

    async def one(i: int, k: int, due: float) -> None:
        res, conn = out[i], None
        try:
            async with asyncio.timeout(5.0):  # from the due time: waiting for a connection counts
                conn = await pool.get()
                req = request(i, k)
                try:
                    status, _ = await exchange(conn, req)
                except asyncio.IncompleteReadError as err:
                    if err.partial:
                        raise
                    res["stale_retries"] += 1  # closed by the server as this request went out
                    pool.drop(conn)
                    conn = await pool.get()
                    status, _ = await exchange(conn, req)
            res["latencies_ms"].setdefault(status, []).append((time.perf_counter() - due) * 1000)
            res["statuses"][status] = res["statuses"].get(status, 0) + 1
            if status != 200:
                res["errors"][f"HTTP {status}"] = res["errors"].get(f"HTTP {status}", 0) + 1
            pool.put(conn)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
            kind = type(err).__name__
            res["errors"][kind] = res["errors"].get(kind, 0) + 1
            if conn is not None:
                pool.drop(conn)

    # one merged schedule: (due offset, stream, k), in time order
    schedule = sorted(
        (k / s["rate"], i, k) for i, s in enumerate(streams) for k in range(int(s["rate"] * seconds))
    )
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.2
    tasks = set()
    for offset, i, k in schedule:
        due = start + offset
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(one(i, k, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    wall = time.perf_counter() - start
    for s, res in zip(streams, out, strict=True):
        res["sent"] = int(s["rate"] * seconds)
    return {"streams": out, "client_cpu": (time.process_time() - cpu0) / wall, "wall_s": wall}


def run_load(url: str, streams: list[dict[str, Any]], seconds: float, pick: str = "lifo") -> dict[str, Any]:
    import subprocess

    args = [sys.executable, __file__, "--load", url, "--streams", json.dumps(streams)]
    args += ["--seconds", str(seconds), "--pick", pick]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def busy_cores() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, now): everything but idle and iowait."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0), time.monotonic()


def process_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its descendants, by pid."""
    import psutil

    out = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:  # a process that just exited
            pass
    return out


def measure(
    url: str, pid: int, redis: int | None, streams: list[dict[str, Any]], seconds: float, pick: str
) -> dict:
    redis_sampler = Sampler(redis) if redis else None
    busy0, t0 = busy_cores()
    workers0 = process_cpu(pid)
    with Sampler(pid) as server:
        if redis_sampler is not None:
            redis_sampler.__enter__()
        load1 = os.getloadavg()[0]
        out = run_load(url, streams, seconds, pick)
        if redis_sampler is not None:
            redis_sampler.__exit__()
    busy1, t1 = busy_cores()
    workers1 = process_cpu(pid)
    per_process = sorted(
        ((workers1[p] - workers0[p]) / (t1 - t0) for p in workers1 if p in workers0), reverse=True
    )
    results = []
    for s, res in zip(streams, out["streams"], strict=True):
        ok = res["latencies_ms"].get("200", [])
        results.append(
            {
                **s,
                "sent": res["sent"],
                "errors": res["errors"],
                "statuses": res["statuses"],
                "stale_retries": res["stale_retries"],
                **summary(ok),
            }  # fmt: skip
        )
    return {
        "streams": results,
        "seconds": seconds,
        "server_cpu": server.cores,
        "redis_cpu": redis_sampler.cores if redis_sampler is not None else None,
        "client_cpu": out["client_cpu"],
        "machine_cpu": (busy1 - busy0) / (t1 - t0),  # all processes: service, load generator, anything else
        "process_cpu": per_process,  # the service's processes (workers, supervisor), busiest first
        "rss_mb": [server.rss_mb[0], server.rss_mb[-1]] if server.rss_mb else [np.nan, np.nan],
        "load1": [load1, os.getloadavg()[0]],
    }


# -- phases and report --------------------------------------------------------------------------------------


def run_store(data_dir: Path, store: str, args: argparse.Namespace) -> dict[str, Any]:
    from llmfeat.serving.local_servers import redis_server

    serving = [f"serving.log_dir={data_dir / 'impressions' / store}", "serving.workers=0", *STATE, *args.set]
    if store == "sqlite":
        return phases(lake_settings(data_dir, *serving), store, args, None)
    with redis_server() as conn:
        settings = lake_settings(data_dir, "feast.online_store=redis", f"feast.redis={conn}", *serving)
        materialize_all(settings)  # features and the newest states into this empty redis-server
        return phases(settings, store, args, redis_pid(int(conn.rsplit(":", 1)[1])))


def phases(settings: Any, store: str, args: argparse.Namespace, redis: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"store": store, "settings": args.set}
    if not args.http_only:
        out["in_process"] = in_process(settings, args.events)
        print(f"{store} in-process push: {fmt(out['in_process'])}", flush=True)
        out["rank_in_process"] = rank_in_process(settings)
        for name, r in out["rank_in_process"].items():
            if name != "services":
                print(f"{store} in-process {name}: {fmt(r)}", flush=True)
    run = uuid.uuid4().hex[:8]
    with service(settings) as (url, proc):
        with urllib.request.urlopen(f"{url}/health") as resp:
            health = json.loads(resp.read())
        print(f"{store}: {url}, models {health['models']}, event path {health['event_path']}", flush=True)
        if health["event_path"] != "on":
            raise RuntimeError(f"the event path is off: {health['event_path']}")
        # warm-up: both arms and both endpoints in every worker
        run_load(url, [{"kind": "rank", "rate": 50, "candidates": 100},
                       {"kind": "events", "rate": 50, "run": f"warm-{run}"}], 5)  # fmt: skip
        push = {"kind": "events", "rate": args.push_rate, "run": f"push-{run}"}
        out["http_push"] = measure(url, proc.pid, redis, [push], args.push_seconds, args.pick)
        print(f"{store} HTTP push: {fmt(out['http_push']['streams'][0])}", flush=True)
        rank = {"kind": "rank", "rate": args.rank_rate, "candidates": 100}
        out["rank_alone"] = measure(url, proc.pid, redis, [rank], args.seconds, args.pick)
        print(f"{store} /rank alone: {fmt(out['rank_alone']['streams'][0])}", flush=True)
        events = {"kind": "events", "rate": args.event_rate, "run": f"mixed-{run}"}
        out["rank_with_events"] = measure(url, proc.pid, redis, [rank, events], args.seconds, args.pick)
        r, e = out["rank_with_events"]["streams"]
        print(f"{store} /rank with events: {fmt(r)}; the events: {fmt(e)}", flush=True)
    return out


def fmt(r: dict[str, Any]) -> str:
    errors = sum(r.get("errors", {}).values())
    return (
        f"n {r['n']:,}, p50 {r['p50']:.2f} ms, p95 {r['p95']:.2f}, p99 {r['p99']:.2f}, max {r['max']:.1f}"
        + (f", errors {errors} {r['errors']}" if "errors" in r else "")
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| store | phase | stream | offered /s | sent | not 200 | p50 ms | p95 ms | p99 ms | max ms | "
        "service CPU | load gen CPU | machine CPU | load avg |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        s, ip = res["store"], res.get("in_process")
        if ip is not None:
            lines.append(
                f"| {s} | in-process | `OnlineState.push([event])`, closed loop | - | {ip['n']:,} | "
                f"{ip['refused'] + ip['duplicates']} | {ip['p50']:.2f} | {ip['p95']:.2f} | {ip['p99']:.2f} | "
                f"{ip['max']:.1f} | {ip['cpu']:.2f} | - | {ip['machine_cpu']:.2f} | {ip['load1']:.1f} |"
            )
        for name in ("http_push", "rank_alone", "rank_with_events"):
            phase = res[name]
            redis = f" + redis {phase['redis_cpu']:.2f}" if phase["redis_cpu"] is not None else ""
            for k, r in enumerate(phase["streams"]):
                stream = "/rank, 100 candidates" if r["kind"] == "rank" else "POST /events"
                bad = ", ".join(f"{kind} {v}" for kind, v in sorted(r["errors"].items())) or "0"
                shared = (
                    f"{phase['server_cpu']:.2f}{redis} | {phase['client_cpu']:.2f} | "
                    f"{phase['machine_cpu']:.2f} | {phase['load1'][0]:.1f} -> {phase['load1'][1]:.1f}"
                    if k == 0
                    else "(same) | | |"
                )
                lines.append(
                    f"| {s} | {name} | {stream} | {r['rate']:g} | {r['sent']:,} | {bad} | {r['p50']:.2f} | "
                    f"{r['p95']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {shared} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="where the lake lives (kept; default: a temporary one)")
    parser.add_argument("--store", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    parser.add_argument("--events", type=int, default=3000, help="in-process pushes measured")
    parser.add_argument("--push-rate", type=float, default=200, help="POST /events alone, per second")
    parser.add_argument("--push-seconds", type=float, default=15)
    parser.add_argument("--rank-rate", type=float, default=200)
    parser.add_argument("--event-rate", type=float, default=200, help="POST /events beside /rank")
    parser.add_argument("--seconds", type=float, default=120, help="each /rank phase")
    parser.add_argument("--set", nargs="*", default=[], help="service settings (KEY=VALUE), for diagnostics")
    parser.add_argument(
        "--pick",
        choices=["lifo", "fifo"],
        default="lifo",
        help="the load generator's idle connection for a request: lifo (a client pool) or fifo (round robin)",
    )
    parser.add_argument("--http-only", action="store_true", help="skip the in-process measurements")
    parser.add_argument("--prepare-only", action="store_true", help="build the lake and stop")
    parser.add_argument("--json", type=Path, help="write every phase's numbers here")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load-generator process
    parser.add_argument("--streams", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        from urllib.parse import urlparse

        target = urlparse(args.load)
        host, port = str(target.hostname), int(target.port or 80)
        run = open_loop(host, port, json.loads(args.streams), args.seconds, pick=args.pick)
        print(json.dumps(run_loop(run)))
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the service and redis-server too
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        prepare(data_dir)
        prepare_state(data_dir)
        if args.prepare_only:
            return 0
        results = [run_store(data_dir, store, args) for store in args.store]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}\n"
    )
    print(table(results))
    print("\nIn-process, 1 user + 100 candidates, ms (p50 / p99): rows remembered | a push before each call")
    for res in results:
        if "rank_in_process" not in res:
            continue
        r = res["rank_in_process"]
        for what in ("rank", "fetch_champion", "fetch_challenger"):
            a, b = r[f"{what}_remembered"], r[f"{what}_after_push"]
            print(f"{res['store']} {what}: {a['p50']:.2f} / {a['p99']:.2f} | {b['p50']:.2f} / {b['p99']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
