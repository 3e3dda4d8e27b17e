"""Replay of logged traffic against the running ranking service (the online A/B without live users).

    llmfeat abtest replay --url http://127.0.0.1:8077      # against a service started with `llmfeat serve`
    llmfeat abtest run                                     # starts the service on a free loopback port,
                                                           # replays, stops it, analyses

What is replayed: the held-out (test) split of the interactions log. Each request is one test-split user
(drawn in proportion to their held-out rows) with up to abtest.candidates of the items that user rated in
the held-out period, in a random order. The service ranks them and shows (and logs) its top serving.slots;
a click is sent for a shown item the user rated >= the label threshold in the log. This replays what users
did, it is not live traffic: an item the user never rated cannot be a candidate, so CTR here measures how well
each arm orders items the user really saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from llmfeat.config import SampleConf
from llmfeat.errors import UserError
from llmfeat.sample import Sample
from llmfeat.serving.local_servers import stop_process

if TYPE_CHECKING:
    from llmfeat.config import Settings
    from llmfeat.delta_io import DeltaTables


@dataclass(frozen=True)
class ReplayRequest:
    user_id: str
    item_ids: list[str]
    labels: dict[str, int]  # item -> logged click label


@dataclass
class ReplaySummary:
    sent: int = 0
    ranked: int = 0
    clicks: int = 0
    errors: Counter[int] = field(default_factory=Counter)  # HTTP status -> count
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        lat = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else [np.nan, np.nan]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"replayed {self.sent:,} requests in {self.seconds:.1f} s: {self.ranked:,} ranked, "
            f"{self.clicks:,} clicks sent, errors {errors}; "
            f"/rank latency p50 {lat[0]:.1f} ms, p99 {lat[1]:.1f} ms"
        )


def held_out_requests(
    tables: DeltaTables, n: int, candidates: int, seed: int = 0, sample: SampleConf | None = None
) -> list[ReplayRequest]:
    """`n` requests from the test split (see the module docstring) of the sampled users (llmfeat/sample.py);
    deterministic for a seed."""
    columns = ["user_id", "item_id", "label"]
    rows = Sample(tables, sample or SampleConf()).read("interactions", columns, split=["test"]).to_pandas()
    test = rows.astype({"user_id": str, "item_id": str})
    groups = {u: g for u, g in test.groupby("user_id") if len(g) >= 2}
    if not groups:
        raise UserError("the test split has no user with two or more rows to replay")
    users = sorted(groups)
    weights = np.array([len(groups[u]) for u in users], dtype=float)
    rng = np.random.default_rng(seed)
    out = []
    for user in rng.choice(users, size=n, p=weights / weights.sum()):
        g = groups[user]
        pick = g.iloc[rng.permutation(len(g))[:candidates]]
        out.append(
            ReplayRequest(
                str(user), pick["item_id"].tolist(), dict(zip(pick["item_id"], pick["label"], strict=True))
            )
        )
    return out


def _post(url: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def replay_one(base_url: str, request: ReplayRequest) -> tuple[int, int, float]:
    """(HTTP status of /rank, clicks sent, latency ms) for one request."""
    started = time.perf_counter()
    status, reply = _post(f"{base_url}/rank", {"user_id": request.user_id, "item_ids": request.item_ids})
    latency = (time.perf_counter() - started) * 1000
    if status != 200:
        return status, 0, latency
    clicks = 0
    for item in reply["items"][: reply["shown"]]:
        if request.labels.get(item["item_id"], 0) == 1:
            click = {
                "request_id": reply["request_id"],
                "item_id": item["item_id"],
                "user_id": request.user_id,
            }
            _post(f"{base_url}/click", click)
            clicks += 1
    return status, clicks, latency


def replay(base_url: str, requests: list[ReplayRequest], workers: int = 4) -> ReplaySummary:
    summary = ReplaySummary()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for status, clicks, latency in pool.map(lambda r: replay_one(base_url, r), requests):
            summary.sent += 1
            if status == 200:
                summary.ranked += 1
                summary.latencies_ms.append(latency)
            else:
                summary.errors[status] += 1
            summary.clicks += clicks
    summary.seconds = time.monotonic() - started
    return summary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the ranking service exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"the ranking service at {base_url} was not ready within {timeout_s:.0f} s")


def child_env() -> dict[str, str]:
    """This process's environment for a child, with the MLflow variables as the process started with them:
    mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI, and the child must use its own settings' store."""
    from llmfeat.registry import ENV

    env = {k: v for k, v in os.environ.items() if k not in ENV}
    return env | {k: v for k, v in ENV.items() if v is not None} | {"PYTHONUNBUFFERED": "1"}


@contextmanager
def running_service(settings: Settings, port: int | None = None) -> Iterator[str]:
    """`llmfeat serve` in a child process on 127.0.0.1 and a free port, with these exact settings; yields its
    URL; on exit it is stopped with SIGTERM (uvicorn drains and the event log flushes its last batch)."""
    port = port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "settings.yaml"
        doc = settings.model_dump(mode="json")
        doc["serving"] |= {"host": "127.0.0.1", "port": port}
        conf.write_text(yaml.safe_dump(doc))
        cmd = [sys.executable, "-m", "llmfeat.cli", "serve", "--config", str(conf)]
        proc = subprocess.Popen(cmd, env=child_env())
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, proc)
            yield base_url
        finally:
            stop_process(proc, timeout_s=30)
