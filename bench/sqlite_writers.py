"""Pushes from several processes into one SQLite online store, as the ranking service's workers push
(results: docs/benchmarks.md, "The SQLite writers").

    .venv/bin/python bench/sqlite_writers.py [--data-dir DIR] [--processes 2] [--rate 100] [--seconds 30]
        [--no-writer-lock]

Each process opens the event path of bench/event_push.py's lake (build it first: `bench/event_push.py
--data-dir DIR --prepare-only`) and pushes one event at a time on a fixed schedule (`--rate` per second
each; events of its own users, so no two processes write one user), latency = `OnlineState.push`. Printed
per process: p50 / p99 / max ms of the pushes, the time spent waiting for the writer (the file lock and
BEGIN IMMEDIATE), and the WAL's frames at the end. `--no-writer-lock` leaves the waiting to SQLite's busy
handler alone (the path before the file lock).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def push_loop(k: int, args: argparse.Namespace, out: Any) -> None:
    from event_push import STATE  # noqa: PLC0415  (the bench lake's settings)
    from serving_load import lake_settings  # noqa: PLC0415

    from llmfeat.feast_repo import open_store
    from llmfeat.serving.state_store import Event, OnlineState, SqliteState

    settings = lake_settings(args.data_dir, *STATE)
    state = OnlineState.open(settings, open_store(settings))
    backend = state.backend
    assert isinstance(backend, SqliteState), "the lake's online store is not SQLite"
    if args.no_writer_lock:
        backend._writer = contextlib.nullcontext()  # type: ignore[assignment]
    waits: list[float] = []
    begin = backend.conn.execute

    def timed_execute(sql: str, *params: Any) -> Any:  # the wait for the writer: lock + BEGIN IMMEDIATE
        if sql != "BEGIN IMMEDIATE":
            return begin(sql, *params)
        started = time.perf_counter()
        result = begin(sql, *params)
        waits.append(time.perf_counter() - started + lock_wait[0])
        return result

    lock_wait = [0.0]
    writer = backend._writer

    class TimedLock:
        def __enter__(self) -> None:
            started = time.perf_counter()
            writer.__enter__()
            lock_wait[0] = time.perf_counter() - started

        def __exit__(self, *exc: object) -> None:
            writer.__exit__(*exc)

    backend._writer = TimedLock()  # type: ignore[assignment]
    backend.conn = _Conn(backend.conn, timed_execute)  # type: ignore[assignment]
    rng = np.random.default_rng(k)
    users = [str(u) for u in range(1 + k, 944, args.processes)]
    latencies: list[float] = []
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        due = start + i / args.rate
        while time.perf_counter() < due:
            time.sleep(0.0002)
        item, label = str(int(rng.integers(1, 1683))), int(rng.integers(0, 2))
        event = Event(uuid.uuid4().hex, users[i % len(users)], item, label, time.time_ns() // 1000)
        started = time.perf_counter()
        state.push([event])
        latencies.append(time.perf_counter() - started)
        i += 1
    with sqlite3.connect(backend.path) as conn:
        frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    out.put({"process": k, "pushes": len(latencies), "push_ms": _ms(latencies), "writer_wait_ms": _ms(waits),
             "wal_frames": frames})  # fmt: skip


class _Conn:
    """The connection with `execute` replaced (sqlite3.Connection's own attributes are read-only)."""

    def __init__(self, conn: sqlite3.Connection, execute: Any):
        self._conn, self.execute = conn, execute

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/ep/lake"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100, help="pushes per second, each process")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--no-writer-lock", action="store_true")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=push_loop, args=(k, args, out)) for k in range(args.processes)]
    for p in procs:
        p.start()
    results = sorted((out.get() for _ in procs), key=lambda r: r["process"])
    for p in procs:
        p.join()
    print(
        json.dumps({"writer_lock": not args.no_writer_lock, "rate": args.rate, "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
