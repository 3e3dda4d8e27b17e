"""The ranking service under an open-loop load (results: docs/benchmarks.md, "Ranking service under load").

    .venv/bin/python bench/serving_load.py [--data-dir DIR] [--store sqlite redis] [--workers 2]
        [--phase 100:200:600 ...] [--json out.json]

A phase CANDIDATES:RATE:SECONDS offers RATE requests per second, each 1 user + CANDIDATES items, for SECONDS
(default: 100 candidates at 200 req/s for 60 s; the 1,000-candidate curve at 10, 20, 40, 60 and 80 req/s for
30 s each; overload, 100 candidates at 1,000 req/s for 20 s; then 200 req/s again for 30 s). What runs:
1. The lake, once per --data-dir (reused): synthetic and MovieLens-100k sized (943 users, 1,682 items,
   100,000 interactions over 200 days), 64-d MARC-shaped user snapshots and item vectors, item metadata and
   daily counters, published and materialized; both CTR models trained by `train-ctr` (1 epoch: the weights
   do not change the cost) and registered as champion (ids, metadata, counters) and challenger (+ vectors).
2. The service: `llmfeat serve` in a child process on loopback (serving.workers processes), on SQLite or on a
   real redis-server (loopback, no persistence) with the same features materialized into it.
3. The load: a second process (this script with --load) with one asyncio loop sending raw HTTP/1.1 over 128
   keep-alive connections opened up front (as a caller's connection pool; a request waits for a free one):
   request k is due at start + k / RATE and its latency runs from then, so a server falling behind shows
   (open loop); a request without an answer 5 s after its due time is an error, as is any status but 200.
   Users and candidates are drawn uniformly.
Reported per phase: sent, errors by kind (any status but 200 is one), p50 / p95 / p99 / max ms of the 200
answers, p99 ms of the 503 answers from the moment each was sent (how fast the service refuses overload;
their due-time latency also holds the wait for a free connection), the service's CPU (all its processes:
user + system seconds per wall second; 1.0 = one core), the load generator's CPU, redis-server's CPU, the
service's resident memory at the start and the end of the phase, and the 1-minute load average. A kept-alive
connection that the server closed just as a request went out is retried once on a new one and counted
(stale_retries in the JSON), as HTTP clients do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

USERS, ITEMS, ROWS, DIM = 943, 1682, 100_000, 64
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Thriller", "Sci-Fi", "Children", "War", "Crime"]
LINEAGE = {"source_version": 1, "encoder_id": "smollm2-135m", "layer": 15, "compressor_name": "marc"}
START = datetime(1997, 9, 20, tzinfo=UTC)
DEFAULT_PHASES = ["100:200:60", *(f"1000:{r}:30" for r in (10, 20, 40, 60, 80)), "100:1000:20", "100:200:30"]


# -- the lake ---------------------------------------------------------------------------------------------


def vector_table(key: str, ids: list[str], vectors: np.ndarray, stamps: list[datetime]) -> pa.Table:
    """A compress-job output table (float16-exact values stored as float32) with its lineage columns."""
    cols: dict[str, Any] = {
        key: pa.array(ids, pa.string()),
        "vector": pa.array(list(vectors.astype(np.float16).astype(np.float32)), pa.list_(pa.float32())),
        "scale": pa.nulls(len(ids), pa.float32()),
        "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
    }
    for name, value in {**LINEAGE, "compressor_version": "1", "dtype": "float16"}.items():
        cols[name] = pa.array([value] * len(ids))
    return pa.table(cols)


def daily_counters(inter: pa.Table, key: str, prefix: str) -> pa.Table:
    """Cumulative impressions and clicks per key and active day, stamped at the next midnight (what the
    materialize job derives with Spark)."""
    df = inter.to_pandas()
    df["day"] = df["event_timestamp"].dt.floor("D")
    daily = df.groupby([key, "day"]).agg(n=("label", "size"), c=("label", "sum")).reset_index()
    daily[[f"{prefix}_impressions", f"{prefix}_clicks"]] = daily.groupby(key)[["n", "c"]].cumsum()
    daily["event_timestamp"] = daily["day"] + timedelta(days=1)
    out = daily[[key, "event_timestamp", f"{prefix}_impressions", f"{prefix}_clicks"]]
    schema = [(key, pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC"))]
    schema += [(f"{prefix}_impressions", pa.int64()), (f"{prefix}_clicks", pa.int64())]
    return pa.Table.from_pandas(out, preserve_index=False).cast(pa.schema(schema))


def write_tables(settings: Any) -> None:
    from llmfeat.delta_io import RustDelta

    rng = np.random.default_rng(0)
    tables = RustDelta(settings.delta_root)
    u_lat, i_lat, proj = rng.normal(size=(USERS, 8)), rng.normal(size=(ITEMS, 8)), rng.normal(size=(8, DIM))
    years = [int(y) if y % 23 else None for y in rng.integers(1930, 1999, ITEMS)]
    genres = ["|".join(sorted(set(rng.choice(GENRES, rng.integers(1, 4)).tolist()))) for _ in range(ITEMS)]
    items = [str(i + 1) for i in range(ITEMS)]
    titles = [f"Item {i}" for i in items]
    tables.write("items", pa.table({"item_id": items, "title": titles, "year": years, "genres": genres}))
    first = rng.uniform(0, 200, USERS)  # users arrive over 200 days and stay about two weeks
    u, i = rng.integers(0, USERS, ROWS), rng.integers(0, ITEMS, ROWS)
    days = first[u] + rng.uniform(0, 14, ROWS)
    order = np.argsort(days)
    u, i, days = u[order], i[order], days[order]
    label = ((u_lat[u] * i_lat[i]).sum(1) + rng.normal(size=ROWS) > 0).astype(np.int32)
    k = np.arange(ROWS)
    split = np.where(k < 0.7 * ROWS, "train", np.where(k < 0.85 * ROWS, "valid", "test"))
    stamps = [START + timedelta(days=float(d)) for d in days]
    inter = pa.table(
        {
            "user_id": pa.array((u + 1).astype(str)),
            "item_id": pa.array((i + 1).astype(str)),
            "rating": pa.array(1.0 + 4 * label, pa.float64()),
            "label": pa.array(label, pa.int32()),
            "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
            "split": pa.array(split),
        }
    )
    tables.write("interactions", inter)
    users = [str(n + 1) for n in range(USERS)]
    snaps = vector_table("user_id", users, u_lat @ proj / 8, [START + timedelta(days=d) for d in first])
    tables.write(
        "user_marc_v1_features",
        snaps.append_column("history_until", pa.nulls(USERS, pa.timestamp("us", tz="UTC"))),
    )
    tables.write("item_marc_v1_features", vector_table("item_id", items, i_lat @ proj / 8, [START] * ITEMS))
    for key, prefix in (("user_id", "user"), ("item_id", "item")):
        tables.write(f"feast_{prefix}_stats", daily_counters(inter, key, prefix))


def materialize_all(settings: Any) -> None:
    from llmfeat.feast_repo import open_store
    from llmfeat.spark_jobs import materialize

    materialize.run(None, settings, full=True)
    materialize.materialize(open_store(settings), ["user_stats_fv", "item_stats_fv"], full=True)


def lake_settings(data_dir: Path, *overrides: str) -> Any:
    from llmfeat.config import load_settings

    base = ["ctr.max_epochs=1", "ctr.n_boot=5"]
    return load_settings("tiny", [f"data_dir={data_dir}", *base, *overrides])


def prepare(data_dir: Path) -> None:
    """Tables, features and both registered models, unless a previous run left them in data_dir."""
    done = data_dir / "bench-lake.done"
    if done.exists():
        return
    from llmfeat.cli.ctr_commands import train_models

    settings = lake_settings(data_dir)
    started = time.monotonic()
    write_tables(settings)
    materialize_all(settings)
    train_models(settings, llm=True, both=True, alias=None)
    done.write_text(f"built in {time.monotonic() - started:.0f} s\n")


# -- the service --------------------------------------------------------------------------------------------


@contextmanager
def service(settings: Any) -> Any:
    """`llmfeat serve` in a child process with these settings; yields (url, process)."""
    import yaml

    from llmfeat.serving.local_servers import free_port, stop_process
    from llmfeat.serving.replay import child_env, wait_ready

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "settings.yaml"
        doc = settings.model_dump(mode="json")
        doc["serving"] |= {"host": "127.0.0.1", "port": port}
        conf.write_text(yaml.safe_dump(doc))
        cmd = [sys.executable, "-m", "llmfeat.cli", "serve", "--config", str(conf)]
        proc = subprocess.Popen(cmd, env=child_env())
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            yield url, proc
        finally:
            stop_process(proc, timeout_s=30)


class Sampler:
    """CPU seconds and resident memory of a process tree, sampled every second in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.rss_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def procs(self) -> list[Any]:
        return [self.root, *self.root.children(recursive=True)]

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # a process that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.rss_mb.append(sum(p.memory_info().rss for p in self.procs()) / 2**20)
            except Exception:
                pass

    def __enter__(self) -> Sampler:
        self._cpu0, self._t0 = self.cpu_s(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cores = (self.cpu_s() - self._cpu0) / (time.monotonic() - self._t0)


# -- the load generator (its own process) -------------------------------------------------------------------


def bodies(candidates: int, n: int = 2000, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = [str(i) for i in rng.choice(ITEMS, candidates, replace=False) + 1]
        out.append(json.dumps({"user_id": str(rng.integers(1, USERS + 1)), "item_ids": items}).encode())
    return out


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Pool:
    """At most `size` kept-alive connections, opened up front; a request waits (FIFO) for a free one.
    `pick`: which idle connection a request takes, "lifo" (the most recently used, as HTTP clients' pools do)
    or "fifo" (the least recently used: requests spread over every connection, as a load balancer's
    round robin does)."""

    def __init__(self, host: str, port: int, size: int, pick: str = "lifo"):
        if pick not in ("lifo", "fifo"):
            raise ValueError(f"pick must be lifo or fifo, not {pick!r}")
        self.host, self.port, self.size, self.pick = host, port, size, pick
        self.idle: deque[Connection] = deque()
        self.open = 0
        self.opened = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def fill(self) -> None:
        for conn in await asyncio.gather(*(self._connect() for _ in range(self.size))):
            self.idle.append(conn)

    async def _connect(self) -> Connection:
        self.open += 1
        self.opened += 1
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.open -= 1
            raise

    async def get(self) -> Connection:
        while True:
            while self.idle:
                conn = self.idle.pop() if self.pick == "lifo" else self.idle.popleft()
                if not conn[0].at_eof():
                    return conn
                self.drop(conn)  # closed by the server while idle
            if self.open < self.size:
                return await self._connect()
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def put(self, conn: Connection) -> None:
        self.idle.append(conn)
        self._wake()

    def drop(self, conn: Connection) -> None:
        conn[1].close()
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


async def exchange(conn: Connection, request: bytes) -> tuple[int, dict[str, str]]:
    """One request and its whole response on a kept-alive connection: (status, lower-case headers)."""
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    await reader.readexactly(int(fields.get("content-length", 0)))
    return int(lines[0].split()[1]), fields


async def open_loop(
    host: str, port: int, rate: float, seconds: float, candidates: int, connections: int = 128
) -> dict[str, Any]:
    requests = [
        b"POST /rank HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), len(b), b)
        for b in bodies(candidates)
    ]
    pool = Pool(host, port, connections)
    await pool.fill()
    latencies: dict[int, list[float]] = {}  # HTTP status -> ms from each request's due time
    exchanges: dict[int, list[float]] = {}  # HTTP status -> ms from sending it (no wait for a connection)
    errors: dict[str, int] = {}
    retry_after = 0
    stale = 0  # requests sent again because their kept-alive connection had just been closed

    async def one(k: int, due: float) -> None:
        nonlocal retry_after, stale
        conn = None
        try:
            async with asyncio.timeout(5.0):  # from the due time: waiting for a connection counts
                conn = await pool.get()
                sent = time.perf_counter()
                try:
                    status, fields = await exchange(conn, requests[k % len(requests)])
                except asyncio.IncompleteReadError as err:
                    if err.partial:
                        raise
                    stale += 1  # closed by the server as this request went out: once more on a new one
                    pool.drop(conn)
                    conn = await pool.get()
                    status, fields = await exchange(conn, requests[k % len(requests)])
            latencies.setdefault(status, []).append((time.perf_counter() - due) * 1000)
            exchanges.setdefault(status, []).append((time.perf_counter() - sent) * 1000)
            if status != 200:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
                retry_after += "retry-after" in fields
            pool.put(conn)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
            kind = type(err).__name__
            errors[kind] = errors.get(kind, 0) + 1
            if conn is not None:
                pool.drop(conn)  # a late answer must not reach the next request

    total = int(rate * seconds)
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.2  # (uvloop's loop.time() counts whole milliseconds)
    tasks = set()
    for k in range(total):
        due = start + k / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(one(k, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    wall = time.perf_counter() - start
    return {
        "sent": total,
        "latencies_ms": latencies,
        "exchange_ms": exchanges,
        "errors": errors,
        "retry_after": retry_after,
        "connections": pool.opened,
        "stale_retries": stale,
        "client_cpu": (time.process_time() - cpu0) / wall,
        "wall_s": wall,
    }


def run_load(url: str, candidates: int, rate: float, seconds: float) -> dict[str, Any]:
    args = [sys.executable, __file__, "--load", url, "--phase", f"{candidates}:{rate:g}:{seconds:g}"]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


# -- phases and report --------------------------------------------------------------------------------------


def measure(url: str, pid: int, phase: str, redis_pid: int | None) -> dict[str, Any]:
    candidates, rate, seconds = phase.split(":")
    redis = Sampler(redis_pid) if redis_pid else None
    with Sampler(pid) as server:
        if redis is not None:
            redis.__enter__()
        load1 = os.getloadavg()[0]
        out = run_load(url, int(candidates), float(rate), float(seconds))
        if redis is not None:
            redis.__exit__()
    by_status = out.pop("latencies_ms")
    lat = np.asarray(by_status.get("200") or [np.nan])  # (JSON keys are strings)
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    shed = np.asarray(out.pop("exchange_ms").get("503") or [np.nan])  # from the send, as the server saw it
    return {
        "candidates": int(candidates),
        "rate": float(rate),
        "seconds": float(seconds),
        **out,
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "max": float(np.max(lat)),
        "shed_p99": float(np.percentile(shed, 99)),
        "server_cpu": server.cores,
        "redis_cpu": redis.cores if redis is not None else None,
        "rss_mb": [server.rss_mb[0], server.rss_mb[-1]] if server.rss_mb else [np.nan, np.nan],
        "rss_series_mb": server.rss_mb,
        "load1": [load1, os.getloadavg()[0]],
    }


def row(store: str, workers: int, r: dict[str, Any]) -> str:
    errors = sum(r["errors"].values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))
    redis = f" + redis {r['redis_cpu']:.2f}" if r["redis_cpu"] is not None else ""
    shed = "-" if np.isnan(r["shed_p99"]) else f"{r['shed_p99']:.1f}"
    return (
        f"| {store} | {workers} | {r['candidates']:,} | {r['rate']:g} | {r['sent']:,} | "
        f"{errors}{f' ({kinds})' if kinds else ''} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
        f"{r['max']:.1f} | {shed} | "
        f"{r['server_cpu']:.2f}{redis} | {r['client_cpu']:.2f} | "
        f"{r['rss_mb'][0]:.0f} -> {r['rss_mb'][1]:.0f} | {r['load1'][0]:.1f} -> {r['load1'][1]:.1f} |"
    )


HEADER = (
    "| store | workers | candidates | offered req/s | sent | errors | p50 ms | p95 ms | p99 ms | max ms | "
    "503 p99 ms | service CPU (cores) | load generator CPU | service RSS MB | load avg |\n"
    "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def run_loop(coroutine: Any) -> Any:
    """Run the load generator's coroutine on uvloop where installed (less client overhead), else asyncio."""
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="where the lake lives (kept; default: a temporary one)")
    parser.add_argument("--store", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    parser.add_argument("--workers", type=int, default=0, help="serving.workers (0: one per core)")
    parser.add_argument("--phase", nargs="+", default=DEFAULT_PHASES, help="CANDIDATES:RATE:SECONDS")
    parser.add_argument("--json", type=Path, help="write every phase's numbers here")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load-generator process
    args = parser.parse_args(argv)
    if args.load:
        from urllib.parse import urlparse

        target, (candidates, rate, seconds) = urlparse(args.load), args.phase[0].split(":")
        run = open_loop(
            str(target.hostname), int(target.port or 80), float(rate), float(seconds), int(candidates)
        )
        print(json.dumps(run_loop(run)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        prepare(data_dir)
        results = []
        for store in args.store:
            results += run_store(data_dir, store, args.workers, args.phase)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}\n"
    )
    print(HEADER)
    for store, workers, r in results:
        print(row(store, workers, r))
    if args.json:
        args.json.write_text(json.dumps([{"store": s, "workers": w, **r} for s, w, r in results], indent=1))
    return 0


def run_store(data_dir: Path, store: str, workers: int, phases: list[str]) -> list[tuple[str, int, Any]]:
    from llmfeat.serving.local_servers import redis_server

    log = f"serving.log_dir={data_dir / 'impressions' / store}"
    serving = [log, f"serving.workers={workers}"]
    if store == "sqlite":
        return serve_phases(lake_settings(data_dir, *serving), store, phases, None)
    with redis_server() as conn:
        settings = lake_settings(data_dir, "feast.online_store=redis", f"feast.redis={conn}", *serving)
        materialize_all(settings)
        port = int(conn.rsplit(":", 1)[1])
        return serve_phases(settings, store, phases, redis_pid(port))


def redis_pid(port: int) -> int | None:
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "redis-server" and any(
            f":{port}" in c or c == str(port) for c in p.info["cmdline"]
        ):
            return int(p.pid)
    return None


def serve_phases(
    settings: Any, store: str, phases: list[str], redis: int | None
) -> list[tuple[str, int, Any]]:
    out = []
    with service(settings) as (url, proc):
        with urllib.request.urlopen(f"{url}/health") as resp:
            health = json.loads(resp.read())
        print(
            f"{store}: {url}, models {health['models']}, array scoring {health['array_scoring']}", flush=True
        )
        run_load(url, 100, 50, 5)  # warm-up
        for phase in phases:
            r = measure(url, proc.pid, phase, redis)
            workers = settings.serving.workers or max(1, min(4, os.cpu_count() or 1))
            out.append((store, workers, r))
            print(row(store, workers, r), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
