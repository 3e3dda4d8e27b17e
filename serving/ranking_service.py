"""Ranking service for the online A/B: FastAPI on uvicorn, bound to 127.0.0.1 unless configured otherwise.

    llmfeat serve [--set serving.port=8077] [--set serving.challenger_share=0.2]

    POST /rank   {"user_id": "196", "item_ids": ["242", "302"], "request_id": "optional"}
              -> {"request_id", "user_id", "arm", "alias", "model", "model_version",
                  "items": [{"item_id", "score", "rank"}, ...]}          (best first)
    POST /click  {"request_id", "item_id"}                                 -> 204
    GET  /health                                                           -> models served, reload state, log
    POST /admin/reload                                                     -> re-resolve both aliases

Per request: the user goes to the challenger when unit_hash(salt:user_id) < serving.challenger_share, else to
the champion (stable: a user always sees the same arm). Features come from the Feast online store (SQLite or
Redis): the LLM vectors (serving/features.py OnlineFeatures) and the item metadata. The model is the pinned
registry version behind the alias at (re)load time. Each ranked item is appended to the event log
(serving/event_log.py) as an impression, each click as a click.

Bad input: no candidates, more than serving.max_candidates, or repeated ids -> 400; a user or item that the
online store does not know (no LLM vector) -> 404 naming them. An alias that does not exist stops the start.
A failed reload keeps the last good model of that arm and reports the error (in the reply and on /health).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

from llmfeat.models.ctr.pyfunc import CtrRanker, load_ranker
from llmfeat.models.evaluation.ab_stats import unit_hash
from llmfeat.registry import ModelRef, resolve
from llmfeat.serving.event_log import EventLog

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import ServingConf, Settings

log = logging.getLogger(__name__)
ARMS = ("champion", "challenger")
META_FEATURES = ["item_meta_fv:year", "item_meta_fv:genres"]


class RankRequest(BaseModel):
    user_id: str
    item_ids: list[str]
    request_id: str | None = None


class ClickEvent(BaseModel):
    request_id: str
    item_id: str
    user_id: str | None = None


@dataclass
class ServedModel:
    ref: ModelRef
    ranker: CtrRanker
    loaded_at: float = field(default_factory=time.time)


Loader = Callable[[str], tuple[ModelRef, CtrRanker]]


class ServingModels:
    """The champion and challenger models; a reload that fails keeps the last good model of that arm."""

    def __init__(self, aliases: dict[str, str], loader: Loader):
        self.aliases, self.loader = aliases, loader
        self.models: dict[str, ServedModel] = {}
        self.reload_errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """At start: every alias must resolve and load, else the error propagates (the service stops)."""
        for arm, alias in self.aliases.items():
            ref, ranker = self.loader(alias)
            self.models[arm] = ServedModel(ref, ranker)

    def reload(self) -> dict[str, Any]:
        for arm, alias in self.aliases.items():
            try:
                ref, ranker = self.loader(alias)
            except Exception as err:  # any failure: keep serving what works
                self.reload_errors[arm] = f"{type(err).__name__}: {err}"
                log.error("reload of %s (@%s) failed, still serving the last good model: %s", arm, alias, err)
                continue
            with self._lock:
                self.models[arm] = ServedModel(ref, ranker)
            self.reload_errors.pop(arm, None)
        return self.status()

    def get(self, arm: str) -> ServedModel:
        with self._lock:
            return self.models[arm]

    def status(self) -> dict[str, Any]:
        return {
            "models": {
                arm: {"alias": m.ref.alias, "version": m.ref.version} for arm, m in self.models.items()
            },
            "reload_errors": dict(self.reload_errors),
        }


def registry_loader(settings: Settings) -> Loader:
    from llmfeat.registry import tracking_uri

    uri = tracking_uri(settings)

    def load(alias: str) -> tuple[ModelRef, CtrRanker]:
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        ref = resolve(settings.ctr.registry_name, alias, uri)
        return ref, load_ranker(ref.uri)

    return load


class CandidateFeatures:
    """Online features of 1 user x N items as a scoring frame (models/ctr/features.py)."""

    def __init__(self, store: FeatureStore):
        from llmfeat.serving.features import OnlineFeatures

        self.store = store
        self.vectors = OnlineFeatures(store)  # fails at start when the vectors were never materialized

    def frame(self, user_id: str, item_ids: list[str]) -> pd.DataFrame:
        batch = self.vectors.fetch(user_id, item_ids)
        unknown = [i for i, m in zip(item_ids, batch.item_missing, strict=True) if m]
        if batch.user_missing or unknown:
            what = ([f"user {user_id!r}"] if batch.user_missing else []) + (
                [f"items {unknown[:10]}"] if unknown else []
            )
            raise HTTPException(404, f"unknown to the feature store: {', '.join(what)}")
        meta = self.store.get_online_features(
            features=META_FEATURES, entity_rows=[{"item_id": i} for i in item_ids]
        ).to_dict()
        return pd.DataFrame(
            {
                "user_id": user_id,
                "item_id": item_ids,
                "year": pd.array(meta["year"], dtype="Float64").astype(float),
                "genres": meta["genres"],
                "user_vector": [batch.user] * len(item_ids),
                "item_vector": list(batch.items),
            }
        )


def assign_arm(user_id: str, cfg: ServingConf) -> str:
    return "challenger" if unit_hash(f"{cfg.salt}:{user_id}") < cfg.challenger_share else "champion"


def check_candidates(req: RankRequest, cfg: ServingConf) -> None:
    if not req.item_ids:
        raise HTTPException(400, "empty candidate list: send at least one item id")
    if len(req.item_ids) > cfg.max_candidates:
        raise HTTPException(400, f"{len(req.item_ids)} candidates; at most {cfg.max_candidates} per request")
    if len(set(req.item_ids)) != len(req.item_ids):
        raise HTTPException(400, "repeated item ids in the candidate list")


def rank(req: RankRequest, cfg: ServingConf, models: ServingModels, features: CandidateFeatures) -> dict:
    check_candidates(req, cfg)
    frame = features.frame(req.user_id, req.item_ids)
    arm = assign_arm(req.user_id, cfg)
    served = models.get(arm)
    scores = served.ranker.score(frame)  # (N,)
    order = np.argsort(-scores, kind="stable")
    items = [{"item_id": req.item_ids[j], "score": float(scores[j]), "rank": r} for r, j in enumerate(order)]
    return {
        "request_id": req.request_id or uuid.uuid4().hex,
        "user_id": req.user_id,
        "arm": arm,
        "alias": served.ref.alias,
        "model": served.ref.name,
        "model_version": served.ref.version,
        "items": items,
    }


def impressions(reply: dict) -> list[dict[str, Any]]:
    now = time.time()
    keys = ("request_id", "user_id", "arm", "alias", "model", "model_version")
    return [
        {"type": "impression", "ts": now, **{k: reply[k] for k in keys}, **item} for item in reply["items"]
    ]


def create_app(
    cfg: ServingConf, models: ServingModels, features: CandidateFeatures, events: EventLog
) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        events.close()  # the last batch reaches the disk on shutdown

    app = FastAPI(title="llmfeat ranking service", lifespan=lifespan)

    @app.post("/rank")
    def rank_endpoint(req: RankRequest) -> dict:
        reply = rank(req, cfg, models, features)
        events.append(*impressions(reply))
        return reply

    @app.post("/click", status_code=204)
    def click_endpoint(click: ClickEvent) -> Response:
        events.append({"type": "click", "ts": time.time(), **click.model_dump()})
        return Response(status_code=204)

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            **models.status(),
            "events_written": events.written,
            "log": str(events.folder),
        }

    @app.post("/admin/reload")
    def reload() -> dict:
        status = models.reload()
        return {"reloaded": not status["reload_errors"], **status}

    return app


def log_dir(settings: Settings) -> Path:
    path = Path(settings.serving.log_dir)
    return path if path.is_absolute() else Path(settings.data_dir) / path


def build_app(settings: Settings, store: FeatureStore | None = None) -> FastAPI:
    """Resolve and load both aliases and open the feature store first: a missing alias fails here."""
    import torch

    from llmfeat.feast_repo import open_store

    torch.set_num_threads(1)  # small per-request batches: threads cost more than they give
    cfg = settings.serving
    models = ServingModels(
        {"champion": cfg.champion_alias, "challenger": cfg.challenger_alias}, registry_loader(settings)
    )
    models.load()
    features = CandidateFeatures(store or open_store(settings))
    events = EventLog(log_dir(settings), cfg.flush_every, cfg.flush_interval_s)
    return create_app(cfg, models, features, events)


def serve(settings: Settings) -> None:
    import uvicorn

    app = build_app(settings)
    cfg = settings.serving
    log.info("ranking service on http://%s:%d (events in %s)", cfg.host, cfg.port, log_dir(settings))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
