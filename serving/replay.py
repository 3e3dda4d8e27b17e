"""Replays of logged traffic against the ranking service.

    llmfeat abtest run [--days N]      # the time-ordered replay (spark_jobs/abtest_replay.py: its workspace)
    llmfeat abtest replay --url URL    # held-out requests against a running service: load and smoke only

The time-ordered replay (`Timeline`, `replay_timeline`): the test period's logged ratings in event order.
Each user's ratings are cut, in time order, into requests of up to abtest.candidates items (a request needs
two); a request is sent at its first rating's time as `request_time`, the service ranks, a click is sent for
every shown item the user liked, and after it, each rating goes to POST /events at its own time, so later
requests read it. At each midnight the caller's `at_boundary` materializes the daily features up to it.
Order at one instant: requests, then the boundary, then events, so a request never reads its own instant.
Every reply says the newest stamp it read per view; one at or after the request's time stops the replay
(`FutureRead`). The replay knows every candidate's rating, so it keeps each request's rankings and labels:
any design (A/B split, interleaving) of any pair of the arms it ranked is simulated exactly from one pass,
because what was shown never changes what is pushed.

`held_out_requests` + `replay`: random test-split users against whatever the service's store holds now (it
reads the future when that store is materialized to now): a load generator, not an experiment.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from llmfeat.config import SampleConf
from llmfeat.errors import UserError
from llmfeat.models.ctr.history import DAY_US, epoch_micros
from llmfeat.sample import Sample
from llmfeat.serving.local_servers import stop_process
from llmfeat.serving.state_store import micros_to_datetime, parse_micros

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


class FutureRead(UserError, RuntimeError):
    """A request read a value stamped at or after its request_time: the replay is not point-in-time."""


@dataclass(frozen=True)
class TimedRequest:
    request_id: str
    user_id: str
    at_us: int  # request_time: its first rating's time
    labels: dict[str, int]  # candidate item -> logged label, in logged order


@dataclass(frozen=True)
class TimedEvent:
    event_id: str
    user_id: str
    item_id: str
    label: int
    at_us: int


@dataclass
class Timeline:
    """Requests, events and midnights of a replay, in the order they are sent (module docstring)."""

    requests: list[TimedRequest]
    events: list[TimedEvent]
    boundaries: list[int]  # midnights (epoch microseconds) inside the period
    start_us: int
    end_us: int

    @classmethod
    def of(cls, rows: pd.DataFrame, candidates: int, days: int) -> Timeline:
        """rows: user_id, item_id, label, event_timestamp of the test split; the first `days` days (from the
        first rating's midnight) are replayed."""
        if rows.empty:
            raise UserError("the test split is empty: nothing to replay")
        at = epoch_micros(rows["event_timestamp"])
        first_day = at.min() // DAY_US * DAY_US
        keep = at < first_day + days * DAY_US
        frame = rows.loc[keep, ["user_id", "item_id", "label"]].astype({"user_id": str, "item_id": str})
        frame = frame.assign(at_us=at[keep]).sort_values(["at_us", "user_id", "item_id"], kind="stable")
        frame = frame.drop_duplicates(["user_id", "item_id"])  # a rating is one event
        events = [
            TimedEvent(f"{r.user_id}:{r.item_id}:{r.at_us}", r.user_id, r.item_id, int(r.label), int(r.at_us))
            for r in frame.itertuples(index=False)
        ]
        requests = []
        for user, mine in frame.groupby("user_id", sort=True):
            for k in range(0, len(mine), candidates):
                chunk = mine.iloc[k : k + candidates]
                if len(chunk) >= 2:
                    at_us = int(chunk["at_us"].iloc[0])
                    labels = dict(zip(chunk["item_id"], chunk["label"].astype(int), strict=True))
                    requests.append(TimedRequest(f"{user}:{at_us}", str(user), at_us, labels))
        requests.sort(key=lambda r: (r.at_us, r.user_id))
        start, end = int(frame["at_us"].min()), int(frame["at_us"].max())
        midnights = list(range(first_day + DAY_US, end + 1, DAY_US))
        return cls(requests, events, midnights, start, end)

    def steps(self) -> list[tuple[int, int, Any]]:
        """(time, order, step): requests (0) before a boundary (1) before events (2) at one instant."""
        steps: list[tuple[int, int, Any]] = [(r.at_us, 0, r) for r in self.requests]
        steps += [(b, 1, b) for b in self.boundaries] + [(e.at_us, 2, e) for e in self.events]
        return sorted(steps, key=lambda s: (s[0], s[1]))


@dataclass(frozen=True)
class RankedRequest:
    """One replayed request: what every arm ranked, the coin of the served draft, the logged labels."""

    request: TimedRequest
    rankings: dict[str, list[str]]
    first: str | None  # the team that picked first (interleave), else None
    read_ts: dict[str, int]  # view -> newest stamp read (epoch microseconds)


@dataclass
class TimelineSummary:
    replayed: list[RankedRequest] = field(default_factory=list)
    events_applied: int = 0
    events_skipped: int = 0  # not pushed: no ranker reads the fresh state
    events_refused: dict[str, str] = field(default_factory=dict)
    clicks: int = 0
    boundaries: int = 0
    seconds: float = 0.0
    min_lead_us: int | None = None  # smallest (request_time - newest stamp read) over all requests

    def as_of_line(self) -> str:
        views = len({v for r in self.replayed for v in r.read_ts})
        lead = (
            ""
            if self.min_lead_us is None
            else f"; the nearest stamp was {self.min_lead_us / 1e6:,.3f} s before"
        )
        return (
            f"the replay served features as of each request: all {len(self.replayed):,} requests read only "
            f"values stamped strictly before their request_time ({views} views checked{lead})"
        )

    def __str__(self) -> str:
        skipped = f" ({self.events_skipped:,} not pushed: no ranker reads the fresh state)"
        return (
            f"replayed {len(self.replayed):,} requests and {self.events_applied:,} events in event order"
            f"{skipped if self.events_skipped else ''}, "
            f"{self.boundaries} daily materializations, in {self.seconds:.1f} s; {self.clicks:,} clicks; "
            f"{len(self.events_refused)} events refused"
        )


class Client:
    """One keep-alive HTTP connection to the service (a replay is sequential)."""

    def __init__(self, base_url: str, timeout_s: float = 60.0):
        parsed = urllib.parse.urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout_s)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        text = resp.read()
        return resp.status, json.loads(text) if text else {}

    def close(self) -> None:
        self.conn.close()


def replay_timeline(
    base_url: str,
    timeline: Timeline,
    at_boundary: Callable[[int], None],
    progress: bool = True,
    push: bool = True,
) -> TimelineSummary:
    """Send the timeline to the service in order (module docstring); `at_boundary(midnight_us)` runs at each
    midnight. A reply that read the future raises `FutureRead` naming the request, the view and the stamp.
    `push=False` skips POST /events, for rankers that read no fresh state (the ratings change nothing they
    read before the next midnight)."""
    from tqdm import tqdm

    summary, client = TimelineSummary(), Client(base_url)
    started = time.monotonic()
    steps = timeline.steps()
    try:
        for at_us, _, step in tqdm(steps, "replay", unit="step", disable=not progress, mininterval=2):
            if isinstance(step, TimedRequest):
                summary.replayed.append(_rank(client, step, summary))
            elif isinstance(step, TimedEvent):
                if push:
                    _push(client, step, summary)
                else:
                    summary.events_skipped += 1
            else:
                at_boundary(at_us)
                summary.boundaries += 1
    finally:
        client.close()
    summary.seconds = time.monotonic() - started
    return summary


def _rank(client: Client, request: TimedRequest, summary: TimelineSummary) -> RankedRequest:
    body = {
        "user_id": request.user_id,
        "item_ids": list(request.labels),
        "request_id": request.request_id,
        "request_time": micros_to_datetime(request.at_us).isoformat(),
    }
    status, reply = client.post("/rank", body)
    if status != 200:
        raise RuntimeError(f"/rank answered {status} for request {request.request_id}: {reply}")
    read = {view: parse_micros(view, ts) for view, ts in reply["read_ts"].items()}
    for view, stamp in read.items():
        if stamp >= request.at_us:
            raise FutureRead(
                f"request {request.request_id} (user {request.user_id}, request_time "
                f"{body['request_time']}) read {view} stamped {micros_to_datetime(stamp).isoformat()}, "
                "not strictly before it: the replay's store holds the future"
            )
        lead = request.at_us - stamp
        summary.min_lead_us = lead if summary.min_lead_us is None else min(summary.min_lead_us, lead)
    shown = [i["item_id"] for i in reply["items"][: reply["shown"]]]
    for item in shown:
        if request.labels.get(item) == 1:
            client.post(
                "/click", {"request_id": reply["request_id"], "item_id": item, "user_id": request.user_id}
            )
            summary.clicks += 1
    rankings = reply.get("rankings") or {reply["arm"]: [i["item_id"] for i in reply["items"]]}
    return RankedRequest(request, rankings, reply.get("first"), read)


def _push(client: Client, event: TimedEvent, summary: TimelineSummary) -> None:
    body = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "label": event.label,
        "event_timestamp": micros_to_datetime(event.at_us).isoformat(),
    }
    status, reply = client.post("/events", body)
    if status == 503:
        raise UserError(
            f"the replay pushes every rating through POST /events, which is off: {reply.get('detail')}"
        )
    if status not in (200, 409):
        raise RuntimeError(f"POST /events answered {status} for {event.event_id}: {reply}")
    summary.events_applied += len(reply.get("applied", []))
    summary.events_refused |= reply.get("refused", {})


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
