"""Ranking service for the online A/B: FastAPI on uvicorn, bound to 127.0.0.1 unless configured otherwise.

    llmfeat serve [--set serving.port=8077] [--set serving.workers=2] [--set serving.challenger_share=0.2]

    POST /rank   {"user_id": "196", "item_ids": ["242", "302"], "request_id": "optional"}
              -> {"request_id", "user_id", "arm", "alias", "model", "model_version", "shown",
                  "cold_user", "cold_items", "items": [{"item_id", "score", "rank"}, ...]}   (best first)
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
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from llmfeat.serving.admission import Admission
from llmfeat.serving.arms import ModelPins, ServingModels, assign_arm, registry_loader
from llmfeat.serving.event_log import EventLog
from llmfeat.serving.event_sink import EventSink
from llmfeat.serving.state_store import Event, EventError, OnlineState

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import ServingConf, Settings

log = logging.getLogger(__name__)


class RankRequest(BaseModel):
    user_id: str
    item_ids: list[str]
    request_id: str | None = None


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


def rank(req: RankRequest, cfg: ServingConf, models: ServingModels) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (reply, impression log line)."""
    check_candidates(req, cfg)
    arm = assign_arm(req.user_id, cfg)
    served = models.get(arm)
    n = len(req.item_ids)
    online = served.features.fetch(req.user_id, req.item_ids)
    columns = {"user_id": [req.user_id] * n, "item_id": req.item_ids, **online.columns}
    scores = served.score(columns)  # (N,)
    order = np.argsort(-scores, kind="stable")
    ids, ranked = req.item_ids, scores[order].tolist()
    shown = min(cfg.slots, n)
    cold_items = [ids[j] for j in np.flatnonzero(online.item_cold)]
    head = {
        "request_id": req.request_id or uuid.uuid4().hex,
        "user_id": req.user_id,
        "arm": arm,
        "alias": served.ref.alias,
        "model": served.ref.name,
        "model_version": served.ref.version,
    }
    reply = head | {
        "shown": shown,
        "cold_user": online.user_cold,
        "missing_user_views": online.missing_user_views,
        "cold_items": cold_items,
        "items": [
            {"item_id": ids[j], "score": s, "rank": r}
            for r, (j, s) in enumerate(zip(order, ranked, strict=True))
        ],
    }
    top = [ids[j] for j in order[:shown]]
    cold = set(cold_items)
    impression = (
        {"type": "impression", "ts": time.time()}
        | head
        | {
            "items": top,
            "scores": [round(s, 6) for s in ranked[:shown]],
            "cold_user": online.user_cold,
            "cold_items": [i for i in top if i in cold],
        }
    )
    return reply, impression


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


def open_event_path(settings: Settings, store: FeatureStore) -> EventPath:
    """The event path over the state the batch job built; not there yet: /events answers 503 saying so."""
    from llmfeat.delta_io import open_tables
    from llmfeat.errors import UserError

    try:
        state = OnlineState.open(settings, store)
    except (UserError, LookupError) as err:  # no state built yet, no compressor registered to build it on
        log.warning("POST /events is off: %s", err)
        return EventPath(None, None, str(err))
    cfg = settings.serving
    return EventPath(state, EventSink(open_tables(settings), cfg.events_flush_every, cfg.events_flush_s))


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

    from llmfeat.feast_repo import open_store

    torch.set_num_threads(1)  # small per-request batches: threads cost more than they give
    cfg = settings.serving
    aliases = {"champion": cfg.champion_alias, "challenger": cfg.challenger_alias}
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
    return app
