"""Latency of the ranking-request fetch: 1 user + 100 items, 64-dim vectors (results: docs/benchmarks.md).

    .venv/bin/python bench/retrieval_latency.py [--seconds 10] [--rate 200] [--items 100]

Builds a store the size of MovieLens-100k (943 users, 1,682 items) in a temporary directory, then measures
p50/p95/p99 of
  - in-process on SQLite and on a real redis-server (loopback): `OnlineFeatures.fetch` and, for reference,
    Feast's generic `get_online_features` for the same request;
  - over HTTP from `feast serve` (SQLite behind it), driven at a fixed request rate by a second process on
    loopback over 16 keep-alive connections (open loop: latency counts from each scheduled send time, so a
    server falling behind shows).
Every phase is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

USERS, ITEMS, DIM = 943, 1682, 64


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "n": len(a),
        "p50": np.percentile(a, 50),
        "p95": np.percentile(a, 95),
        "p99": np.percentile(a, 99),
    }


def timed(fn: Callable[[], object], seconds: float, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return percentiles(out)


def build_lake(data_dir: Path, online: list[str]):  # type: ignore[no-untyped-def]
    """Synthetic vectors in the compress job's schema, published and materialized under `online`."""
    from llmfeat.config import load_settings
    from llmfeat.delta_io import RustDelta
    from llmfeat.feast_repo import apply_repo
    from llmfeat.spark_jobs.materialize import materialize, publish, views_on

    settings = load_settings("tiny", [f"data_dir={data_dir}", *online])
    tables = RustDelta(settings.delta_root)
    if not tables.exists("item_marc_v1_features"):
        rng = np.random.default_rng(0)
        ts = datetime.now(UTC) - timedelta(hours=1)
        for name, key, n in (
            ("user_marc_v1_features", "user_id", USERS),
            ("item_marc_v1_features", "item_id", ITEMS),
        ):
            vecs = rng.normal(size=(n, DIM)).astype(np.float16).astype(np.float32)
            cols = {
                key: pa.array([str(i) for i in range(1, n + 1)]),
                "vector": pa.array(list(vecs), pa.list_(pa.float32())),
                "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
                "source_version": pa.array([0] * n, pa.int64()),
                "encoder_id": pa.array(["smollm2-135m"] * n),
                "layer": pa.array([15] * n, pa.int64()),
                "compressor_name": pa.array(["marc"] * n),
                "compressor_version": pa.array(["1"] * n),
                "dtype": pa.array(["float16"] * n),
            }
            tables.write(name, pa.table(cols))
    published = publish(None, tables)
    store = apply_repo(settings)
    materialize(store, views_on([p.table for p in published if p.version >= 0]), full=True)
    return settings, store


def request_ids(rng: np.random.Generator, n_items: int) -> tuple[str, list[str]]:
    items = rng.choice(ITEMS, size=n_items, replace=False) + 1
    return str(rng.integers(1, USERS + 1)), [str(i) for i in items]


def in_process(store, online_store: str, n_items: int, seconds: float) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    from llmfeat.serving.features import OnlineFeatures

    features, rng = OnlineFeatures(store, online_store=online_store), np.random.default_rng(1)

    def fetch() -> object:
        return features.fetch(*request_ids(rng, n_items))

    def generic() -> object:
        user, items = request_ids(rng, n_items)
        rows = [{"user_id": user, "item_id": i} for i in items]
        return store.get_online_features(features=store.get_feature_service("ctr_marc_v2"), entity_rows=rows)

    return {"OnlineFeatures.fetch": timed(fetch, seconds), "get_online_features": timed(generic, seconds / 2)}


def load_generator(url: str, rate: float, seconds: float, n_items: int, connections: int = 16) -> list[float]:
    """Open-loop client: request k is due at start + k/rate and goes out on connection k % `connections`
    (keep-alive, one thread each, so a server with several workers sees concurrent requests); its latency runs
    from that due time, so a server falling behind shows."""
    import threading

    from llmfeat.serving.features import HttpFeatures

    target = urlparse(url)
    client, rng = HttpFeatures(url), np.random.default_rng(2)
    bodies = [client.request_body(*request_ids(rng, n_items)) for _ in range(500)]
    headers = {"Content-Type": "application/json"}
    total = int(rate * seconds)
    out: list[float] = [0.0] * total
    errors: list[str] = []

    def send(conn: http.client.HTTPConnection, body: bytes) -> None:
        conn.request("POST", "/get-online-features", body, headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            errors.append(f"HTTP {resp.status}: {payload[:200]!r}")

    def worker(i: int, start: float) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        for k in range(i, total, connections):
            due = start + k / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            send(conn, bodies[k % len(bodies)])
            out[k] = (time.perf_counter() - due) * 1e3

    warm = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    for body in bodies[:20]:
        send(warm, body)
    start = time.perf_counter() + 0.1
    threads = [threading.Thread(target=worker, args=(i, start)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return out


def over_http(settings: Any, rate: float, seconds: float, n_items: int, workers: int) -> dict[str, float]:
    from llmfeat.serving.local_servers import feast_serve

    with feast_serve(settings, workers=workers) as url:
        args = [sys.executable, __file__, "--load", url, "--rate", str(rate), "--seconds", str(seconds)]
        done = subprocess.run([*args, "--items", str(n_items)], capture_output=True, text=True, check=True)
    ms = json.loads(done.stdout)
    stats = percentiles(ms)
    stats["offered_rps"] = rate
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--rate", type=float, nargs="+", default=[200.0], help="HTTP requests per second")
    parser.add_argument("--items", type=int, default=100, help="candidate items per request")
    parser.add_argument("--workers", type=int, default=1, help="feast serve worker processes")
    parser.add_argument("--http-only", action="store_true", help="skip the in-process phases")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load-generator process
    args = parser.parse_args(argv)
    if args.load:
        print(json.dumps(load_generator(args.load, args.rate[0], args.seconds, args.items)))
        return 0

    from llmfeat.serving.local_servers import redis_server

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        settings, store = build_lake(data_dir, [])
        if not args.http_only:
            for name, stats in in_process(store, "sqlite", args.items, args.seconds).items():
                results[f"in-process SQLite, {name}"] = stats
            with redis_server() as conn:
                _, redis_store = build_lake(data_dir, ["feast.online_store=redis", f"feast.redis={conn}"])
                for name, stats in in_process(redis_store, "redis", args.items, args.seconds).items():
                    results[f"in-process Redis, {name}"] = stats
            settings, _ = build_lake(data_dir, ["feast.online_store=sqlite"])
        for rate in args.rate:
            results[f"HTTP feast serve -w {args.workers} (SQLite), {rate:.0f} req/s offered"] = over_http(
                settings, rate, args.seconds, args.items, args.workers
            )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}"
    )
    print(f"request: 1 user + {args.items} items, {DIM}-dim float32; {args.seconds:.0f} s per phase\n")
    print("| path | requests | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['n']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
