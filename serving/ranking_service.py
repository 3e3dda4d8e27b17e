"""Ranking service for the online A/B: FastAPI on uvicorn, bound to 127.0.0.1 unless configured otherwise.

    llmfeat serve [--set serving.port=8077] [--set serving.workers=2] [--set serving.challenger_share=0.2]

    POST /rank   {"user_id": "196", "item_ids": ["242", "302"], "request_id"?, "request_time"?}
              -> {"request_id", "user_id", "experiment", "arm", "alias", "model", "model_version", "shown",
                  "cold_user", "cold_items", "items": [{"item_id", "score", "rank"}, ...]}   (best first)
              serving.experiment=interleave: {..., "versions": {arm: version}, "first": arm,
                  "rankings": {arm: [item ids]}, "items": [{"item_id", "team", "rank"}, ...]}  (shown only)
              with request_time: {..., "request_time", "read_ts": {view: newest timestamp read}}
    POST /click  {"request_id", "item_id"}                                 -> 204 (the experiment's log only)
    POST /events {"event_id", "user_id", "item_id", "label", "event_timestamp"?}
              -> {"applied": [...], "duplicates": [...], "refused": {id: reason}}   (409 when refused)
    GET  /health                                                           -> models, reload state, log, load
    POST /admin/reload                                                     -> re-resolve both aliases

Per request (serving/arms.py): the user's arm by a stable hash; that arm's model version, pinned at (re)load;
every field of the model's feature service for 1 user + N items through the in-process online read (SQLite
or Redis, serving/features.py); one batched call of the registered ranker. The top `serving.slots` items are
what is shown: they alone are logged, as one compact line per request (serving/event_log.py), with the
request id that clicks join on.

Interleaving (`serving.experiment: interleave`): both arms rank every request and the shown slots are their
team draft (models/evaluation/interleaving.py): a coin flip by a stable hash of the request id picks the
first team, then the teams alternate. The reply and the log carry both full rankings, each slot's team, the
coin, both versions; a click is credited to its slot's team (`llmfeat abtest analyze`). Shadow arms
(`serving.shadow_aliases`) rank every request too and are logged, never shown: a replay compares them all
from one pass. A `request_time` asks what the request read: the newest stamp per view (Feast's own read),
which a replay checks is strictly before it.

Events (serving/state_store.py): an event updates the user's and the item's fresh state in the online store
in one per-user transaction (idempotent by event id; an event older than the user's newest is refused with
its reason; server time when no event_timestamp is given), and the next /rank reads it. Applied events are
appended to the `pushed_events` Delta table in batches (serving/event_sink.py). The event path needs the
state built once (`llmfeat user-state`, `llmfeat features`); until then /events answers 503 naming that.

Cold start: a user or item that the online store lacks (in any view the model reads) is still ranked, with
the model's own fallback for what is missing: the default vector (the training mean, flagged to the model as
missing), zero counters, unknown year and genres, the unseen-id embedding. The reply and the log flag it
(`cold_items`; `cold_user`: with a fresh state view, the user has no event in it; without one, the user
is missing from a user view; `missing_user_views` lists the user views the user is missing from). Bad
input gets 400 (no candidates, more than serving.max_candidates, repeated ids) or 422 (a malformed body).
Overload gets 503 with Retry-After (serving/admission.py).

Several workers (`serving.workers`, serving/server.py): processes with a socket each on one port
(SO_REUSEPORT: the kernel spreads connections over them); the parent pins the versions before they start
(serving/arms.py ModelPins). An alias that does not exist stops the start. A failed reload keeps
the last good model of that arm and reports the error (in the reply and on /health).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from llmfeat.models.evaluation.ab_stats import unit_hash
from llmfeat.models.evaluation.interleaving import team_draft
from llmfeat.serving.admission import Admission
from llmfeat.serving.arms import ARMS, ModelPins, ServingModels, assign_arm, registry_loader
from llmfeat.serving.event_log import EventLog
from llmfeat.serving.event_sink import EventSink
from llmfeat.serving.state_store import Event, EventError, OnlineState, micros_to_datetime, parse_micros

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import ServingConf, Settings

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval in a worker: see build_app


class RankRequest(BaseModel):
    user_id: str
    item_ids: list[str]
    request_id: str | None = None
    request_time: str | float | None = None  # ISO 8601 or epoch seconds: the reply then says what it read


class ClickEvent(BaseModel):
    request_id: str
    item_id: str
    user_id: str | None = None


def check_candidates(req: RankRequest, cfg: ServingConf) -> None:
    if not req.item_ids:
        raise HTTPException(400, "empty candidate list: send at least one item id")
    if len(req.item_ids) > cfg.max_candidates:
        raise HTTPException(400, f"{len(req.item_ids)} candidates; at most {cfg.max_candidates} per request")
    if len(set(req.item_ids)) != len(req.item_ids):
        raise HTTPException(400, "repeated item ids in the candidate list")


def request_micros(req: RankRequest) -> int | None:
    if req.request_time is None:
        return None
    try:
        return parse_micros(req.request_id, req.request_time)
    except EventError as err:
        raise HTTPException(400, str(err).replace("event_timestamp", "request_time")) from None


def rank(req: RankRequest, cfg: ServingConf, models: ServingModels) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (reply, impression log line). `ab`: the user's arm ranks and its top slots are shown; `interleave`:
    both arms rank and the shown slots are their team draft (models/evaluation/interleaving.py). Shadow
    arms rank every request too, logged, never shown. With a request_time, the reply says what it read."""
    check_candidates(req, cfg)
    at_us = request_micros(req)
    request_id = req.request_id or uuid.uuid4().hex
    ranked = [assign_arm(req.user_id, cfg)] if cfg.experiment == "ab" else list(ARMS)
    scored = Scored(req, models, [*ranked, *models.shadows])
    ids, first = req.item_ids, scored.served[ranked[0]]
    online = scored.online[first.ref.feature_service]
    cold_items = [ids[j] for j in np.flatnonzero(online.item_cold)]
    head: dict[str, Any] = {
        "request_id": request_id,
        "user_id": req.user_id,
        "experiment": cfg.experiment,
        "model": first.ref.name,
    }
    if cfg.experiment == "ab":
        arm = ranked[0]
        head |= {"arm": arm, "alias": first.ref.alias, "model_version": first.ref.version}
        order, scores = scored.orders[arm], scored.scores[arm]
        top, teams = [ids[j] for j in order[: min(cfg.slots, len(ids))]], None
        extra: dict[str, Any] = {}
        items = [{"item_id": ids[j], "score": float(scores[j]), "rank": r} for r, j in enumerate(order)]
    else:
        a_first = unit_hash(f"{cfg.salt}:draft:{request_id}") < 0.5
        top, drafted = team_draft(
            scored.ranking("champion"), scored.ranking("challenger"), cfg.slots, a_first
        )
        teams = [ARMS[t] for t in drafted]
        head |= {"versions": {a: scored.served[a].ref.version for a in ARMS}}
        extra = {"first": ARMS[0] if a_first else ARMS[1]}  # the team that picked first
        items = [
            {"item_id": i, "team": t, "rank": r} for r, (i, t) in enumerate(zip(top, teams, strict=True))
        ]
    rankings = {
        a: scored.ranking(a) for a in scored.orders if cfg.experiment == "interleave" or a not in ARMS
    }
    if rankings:
        extra["rankings"] = rankings
    if at_us is not None:
        extra["request_time"] = micros_to_datetime(at_us).isoformat()
        extra["read_ts"] = scored.stamps()
    reply = (
        head
        | extra
        | {
            "shown": len(top),
            "cold_user": online.user_cold,
            "missing_user_views": online.missing_user_views,
            "cold_items": cold_items,
            "items": items,
        }
    )
    cold = set(cold_items)
    impression = (
        {"type": "impression", "ts": time.time()}
        | head
        | extra
        | {"items": top, "cold_user": online.user_cold, "cold_items": [i for i in top if i in cold]}
    )
    if teams is not None:
        impression["teams"] = teams
    else:
        impression["scores"] = [
            round(float(scored.scores[ranked[0]][j]), 6) for j in scored.orders[ranked[0]][: len(top)]
        ]
    return reply, impression


class Scored:
    """One request ranked by several arms: each feature service is read once, each arm scores once."""

    def __init__(self, req: RankRequest, models: ServingModels, arms: list[str]):
        self.req, self.served = req, {a: models.get(a) for a in arms}
        self.online: dict[str, Any] = {}
        self.scores: dict[str, np.ndarray] = {}
        self.orders: dict[str, np.ndarray] = {}
        n = len(req.item_ids)
        for arm, served in self.served.items():
            service = served.ref.feature_service
            if service not in self.online:
                self.online[service] = served.features.fetch(req.user_id, req.item_ids)
            columns = {"user_id": [req.user_id] * n, "item_id": req.item_ids, **self.online[service].columns}
            self.scores[arm] = served.score(columns)  # (N,)
            self.orders[arm] = np.argsort(-self.scores[arm], kind="stable")

    def ranking(self, arm: str) -> list[str]:
        return [self.req.item_ids[j] for j in self.orders[arm]]

    def stamps(self) -> dict[str, str]:
        """Every view read for this request -> the newest timestamp among the rows read (ISO 8601)."""
        newest: dict[str, int] = {}
        for served in {s.ref.feature_service: s for s in self.served.values()}.values():
            for view, us in served.features.stamps(self.req.user_id, self.req.item_ids).items():
                newest[view] = max(us, newest.get(view, us))
        return {view: micros_to_datetime(us).isoformat() for view, us in sorted(newest.items())}


class EventPath:
    """POST /events: the online state and the Delta sink, or why they are not there."""

    def __init__(self, state: OnlineState | None, sink: EventSink | None, unavailable: str = ""):
        self.state, self.sink, self.unavailable = state, sink, unavailable

    def push(self, body: Any) -> Response:
        if self.state is None or self.sink is None:
            raise HTTPException(503, f"the event path is not available: {self.unavailable}")
        if not isinstance(body, dict):
            raise HTTPException(400, "an event is a JSON object: event_id, user_id, item_id, label")
        try:
            event = Event.parse(body)
        except EventError as err:
            raise HTTPException(400, str(err)) from None
        result = self.state.push([event])
        if result.applied:
            self.sink.append([event])
        status = 409 if result.refused else 200
        return Response(json.dumps(result.as_dict()), status_code=status, media_type="application/json")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.state is not None:
            self.state.close()


def open_event_path(settings: Settings, store: FeatureStore) -> EventPath:
    """The event path over the state the batch job built; not there yet: /events answers 503 saying so."""
    from llmfeat.delta_io import RustDelta, open_tables
    from llmfeat.errors import UserError

    try:
        state = OnlineState.open(settings, store)
    except (UserError, LookupError) as err:  # no state built yet, no compressor registered to build it on
        log.warning("POST /events is off: %s", err)
        return EventPath(None, None, str(err))
    cfg = settings.serving
    tables = RustDelta(Path(cfg.events_root)) if cfg.events_root else open_tables(settings)
    return EventPath(state, EventSink(tables, cfg.events_flush_every, cfg.events_flush_s))


def create_app(
    cfg: ServingConf, models: ServingModels, events: EventLog, event_path: EventPath | None = None
) -> Admission:
    """The FastAPI app behind the load-shedding wrapper (the wrapper is what uvicorn runs)."""
    pushes = event_path or EventPath(None, None, "the service was built without one")
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        follower = asyncio.create_task(follow_pins(models, cfg.pin_check_s)) if models.pins else None
        yield
        if follower is not None:
            follower.cancel()
        events.close()  # the last batch reaches the disk on shutdown
        pushes.close()  # and the last applied events reach the events table

    app = FastAPI(title="llmfeat ranking service", lifespan=lifespan)
    admission = Admission(app, cfg.max_inflight, cfg.max_wait_ms, cfg.retry_after_s)

    # async endpoints run on the event loop itself: no thread hop per request, and requests queue where
    # Admission can see them (a sync endpoint would queue them in a thread pool instead)
    @app.post("/rank")
    async def rank_endpoint(req: RankRequest) -> Response:
        reply, impression = rank(req, cfg, models)
        events.append(impression)
        return Response(json.dumps(reply), media_type="application/json")

    @app.post("/click", status_code=204)
    async def click_endpoint(click: ClickEvent) -> Response:
        events.append({"type": "click", "ts": time.time(), **click.model_dump()})
        return Response(status_code=204)

    @app.post("/events")
    async def events_endpoint(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        # On the event loop, like /rank: a push is short (about 0.5 ms on SQLite), and in a thread beside the
        # loop it competes for the GIL; measured both ways, the tails moved less than between repeated runs.
        return pushes.push(body)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            **models.status(),
            "worker": os.getpid(),
            "events_written": events.written,
            "pushed_events_written": pushes.sink.written if pushes.sink else 0,
            "event_path": "on" if pushes.state else f"off: {pushes.unavailable}",
            "events_dropped": events.dropped,
            "shed": dict(admission.shed),
            "inflight": admission.inflight,
            "log": str(events.folder),
        }

    @app.post("/admin/reload")
    def reload() -> dict:  # sync: loading a model blocks, so it runs in the thread pool, not on the loop
        status = models.reload()
        return {"reloaded": not status["reload_errors"], **status}

    return admission


async def follow_pins(models: ServingModels, every_s: float) -> None:
    """Pick up the versions a reload in another worker pinned (model loading off the event loop)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(models.follow_pins)
        except Exception as err:  # keep following; the error is on /health via reload_errors
            log.error("following the pinned versions failed: %s", err)


def log_dir(settings: Settings) -> Path:
    path = Path(settings.serving.log_dir)
    return path if path.is_absolute() else Path(settings.data_dir) / path


def build_app(
    settings: Settings, store: FeatureStore | None = None, pins: ModelPins | None = None
) -> Admission:
    """Load both arms (the pinned versions, else the aliases) and open the feature store: a missing alias or
    feature service, or a `store` whose online store is not the one feast.online_store names, fails here."""
    import torch

    from llmfeat.errors import UserError
    from llmfeat.feast_repo import open_store

    torch.set_num_threads(1)  # small per-request batches: threads cost more than they give
    cfg = settings.serving
    aliases = {"champion": cfg.champion_alias, "challenger": cfg.challenger_alias}
    clash = set(cfg.shadow_aliases) & {*aliases, *aliases.values()}
    if clash:
        raise UserError(f"serving.shadow_aliases {sorted(clash)} clash with the champion or challenger arm")
    aliases |= {alias: alias for alias in cfg.shadow_aliases}
    store = store or open_store(settings)
    models = ServingModels(aliases, registry_loader(settings), store, settings.feast.online_store, pins)
    models.load()
    events = EventLog(
        log_dir(settings), cfg.flush_every, cfg.flush_interval_s, cfg.segment_mb << 20, cfg.segment_s
    )
    app = create_app(cfg, models, events, open_event_path(settings, store))
    # Half a million objects are alive after loading (torch, mlflow, feast); a full collection that walks them
    # stops the worker for about 0.3 s. Frozen, later collections walk only what requests leave behind.
    gc.collect()
    gc.freeze()
    # The loop shares the GIL with the background threads (the event log's JSON, the Delta sink, the WAL
    # checkpoint): at Python's default 5 ms switch interval one of them held a request for up to 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return app
