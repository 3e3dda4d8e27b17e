"""Online features for one ranking request: 1 user + N candidate items, in one call, as arrays.

    store, kind = open_store(settings), settings.feast.online_store  # kind: sqlite or redis
    features = ServiceFeatures(store, "ctr_marc_v2", kind)   # every field of a model's feature service
    row = features.fetch("196", ["242", "302", ...])         # OnlineColumns
    row.columns    {"year": [N] float64 (NaN = null), "genres": [N] object (None = null),
                    "user_vector": [N, D] float32 (NaN rows = missing), ...}   (user fields repeated N times)
    row.user_cold  bool   row.item_cold  [N] bool   (an entity absent from one of its views; with a fresh
                   state view, user_cold means no event in it)   row.missing_user_views  [view names]

    features = OnlineFeatures(store, online_store=kind)      # the user and item vectors only
    batch = features.fetch("196", ["242", "302", ...])       # RankingFeatures
    batch.user     [D] float32     batch.user_missing  bool
    batch.items    [N, D] float32  batch.item_missing  [N] bool   (unknown ids: zeros + flag)
    user, items, item_missing = batch.to_torch()

Which views and fields are read comes from a feature service (the one a registered model records in its
`feast.feature_service` tag; `OnlineFeatures` defaults to `ctr.llm_feature_service`), resolved once through
Feast's registry, so renamed or versioned views need no change here. The rows are read with cached entity
keys, in one SQLite query per view or one Redis script call per request, and decoded straight into arrays
(serving/online_read.py). Which of the two is the setting `feast.online_store`, passed in with the store that
Feast built from the same settings; a store of another kind fails at start. Feast's generic
`get_online_features` returns the same values as Python lists (bench/retrieval_latency.py measures both).
`HttpFeatures` fetches the same arrays from `feast serve` (POST /get-online-features).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmfeat.config import CtrConf
from llmfeat.feast_repo import FeatureStoreError
from llmfeat.serving.online_read import (
    FieldsRequest,
    ScalarDecoder,
    configured_online_store,
    decode_vectors,
    rows_reader,
)
from llmfeat.serving.state_store import parse_micros

if TYPE_CHECKING:
    import torch
    from feast import FeatureStore, FeatureView

MATERIALIZE_HINT = "run `llmfeat features materialize` (after `llmfeat compress`)"
REQUEST_KEYS = ("user_id", "item_id")  # what a ranking request names
VECTOR_TYPES = ("Array(Float32)", "Array(Float64)")


@dataclass(frozen=True)
class ServedField:
    view: FeatureView  # with the service's projection (its version, if any)
    name: str
    key: str  # user_id or item_id
    dim: int  # vector length; 0 for a scalar
    text: bool  # a string scalar (else numbers, as float64)


def service_fields(store: FeatureStore, service: str) -> list[ServedField]:
    """Every field of a feature service with its view and entity key; a view keyed by anything but a user or
    an item fails here, at start, naming the view."""
    from feast.utils import _get_feature_views_to_use

    try:
        resolved = store.get_feature_service(service)
    except Exception as err:
        raise FeatureStoreError(
            f"feature service {service!r} is not in the registry: run `llmfeat features apply`"
        ) from err
    views, on_demand = _get_feature_views_to_use(store.registry, store.project, resolved, allow_cache=True)
    if on_demand:
        raise FeatureStoreError(f"feature service {service!r} has on-demand views: not served in-process")
    out = []
    for view in views:
        keys = [view.projection.join_key_map.get(c.name, c.name) for c in view.entity_columns]
        if len(keys) != 1 or keys[0] not in REQUEST_KEYS:
            raise FeatureStoreError(
                f"view {view.name!r} is keyed by {keys}: a ranking request has user_id, item_id"
            )
        for f in view.projection.features:
            dtype = str(f.dtype)
            if dtype in VECTOR_TYPES and not f.vector_length:
                raise FeatureStoreError(f"{view.name}:{f.name} declares no vector_length")
            dim = f.vector_length if dtype in VECTOR_TYPES else 0
            out.append(ServedField(view, f.name, keys[0], dim, dtype == "String"))
    return out


def check_materialized(store: FeatureStore, fields: list[ServedField]) -> None:
    """Fails naming the first view that was never materialized (its online table would be empty or absent)."""
    for name in dict.fromkeys(f.view.name for f in fields):
        if not store.get_feature_view(name).materialization_intervals:  # (a projection copy has none)
            raise FeatureStoreError(f"feature view {name!r} has never been materialized: {MATERIALIZE_HINT}")


@dataclass(frozen=True)
class OnlineColumns:
    """One request's scoring columns (see the module docstring) and which entities the store lacks."""

    columns: dict[str, Any]
    user_cold: bool
    item_cold: np.ndarray  # [N] bool
    missing_user_views: list[str] = field(default_factory=list)


class ServiceFeatures:
    """Every field of one feature service for 1 user + N items, through the fast in-process read of the
    online store that `online_store` (the setting feast.online_store: sqlite or redis) names."""

    def __init__(self, store: FeatureStore, service: str, online_store: str):
        self.service, self.store = service, store
        self.fields = service_fields(store, service)
        check_materialized(store, self.fields)
        self._rows = rows_reader(store, online_store)
        self._scalars = ScalarDecoder()
        self._views: dict[tuple[str, str], tuple[FeatureView, list[ServedField]]] = {}
        for f in self.fields:
            self._views.setdefault((f.view.projection.name_to_use(), f.key), (f.view, []))[1].append(f)
        # a fresh state view tells whether the user has any event (cold_user); else any missing user view
        self._fresh = any(
            v.tags.get("kind") == "state" and k == "user_id" for (_, k), (v, _) in self._views.items()
        )

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]

    def fetch(self, user_id: str, item_ids: list[str]) -> OnlineColumns:
        n = len(item_ids)
        ids = {"user_id": [user_id], "item_id": list(item_ids)}
        requests: list[FieldsRequest] = [
            (view, [f.name for f in fields], key, ids[key])
            for (_, key), (view, fields) in self._views.items()
        ]
        try:
            rows = self._rows.read_fields(requests)
        except sqlite3.OperationalError as err:  # the table is created by apply, filled by materialize
            raise FeatureStoreError(f"online table is missing ({err}): {MATERIALIZE_HINT}") from None
        columns: dict[str, Any] = {}
        missing, no_events, item_cold = [], False, np.zeros(n, dtype=bool)
        for ((name, key), (view, fields)), found in zip(self._views.items(), rows, strict=True):
            first = found[fields[0].name]  # a view's fields are written together: one tells presence
            absent = np.array([v is None for v in first], dtype=bool)
            for f in fields:
                columns[f.name] = self._decode(f, found[f.name], n)
            if key == "item_id":
                item_cold |= absent
            elif absent[0]:
                missing.append(name)
                no_events |= view.tags.get("kind") == "state"
        user_cold = no_events if self._fresh else bool(missing)
        return OnlineColumns(columns, user_cold, item_cold, missing)

    def stamps(self, user_id: str, item_ids: list[str]) -> dict[str, int]:
        """The newest event timestamp (epoch microseconds) of the rows each view holds for these entities,
        through Feast's own online read (slower: for a request that asks what it read, as a replay does)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        online: Any = self.store._get_provider().online_store
        ids = {"user_id": [user_id], "item_id": list(item_ids)}
        out = {}
        for (name, key), (view, fields) in self._views.items():
            keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=i)]) for i in ids[key]]
            rows = online.online_read(self.store.config, view, keys, [fields[0].name])
            found = [ts for ts, values in rows if ts is not None and values]
            if found:
                out[name] = max(parse_micros(name, ts) for ts in found)
        return out

    def _decode(self, f: ServedField, values: list[bytes | None], n: int) -> Any:
        if f.dim:
            vectors, missing = decode_vectors(values, f.dim)
            vectors[missing] = np.nan
            return np.broadcast_to(vectors, (n, vectors.shape[1])) if f.key == "user_id" else vectors
        decoded = self._scalars(values)
        if f.text:
            column = np.empty(len(decoded), dtype=object)
            column[:] = decoded
        else:
            column = np.array([np.nan if v is None else v for v in decoded], dtype=np.float64)
        return np.repeat(column, n) if f.key == "user_id" else column


@dataclass(frozen=True)
class RankingFeatures:
    user: np.ndarray  # [D] float32, zeros when missing
    items: np.ndarray  # [N, D] float32, zero rows where missing
    user_missing: bool
    item_missing: np.ndarray  # [N] bool

    def to_torch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user [D], items [N, D], item_missing [N]) sharing memory with the arrays."""
        import torch

        return torch.from_numpy(self.user), torch.from_numpy(self.items), torch.from_numpy(self.item_missing)


class OnlineFeatures:
    """In-process retrieval of the user and item vectors of a feature service from the online store that
    `online_store` (the setting feast.online_store: sqlite or redis) names, else the kind the store's own
    config names; the service defaults to the LLM CTR model's (`ctr.llm_feature_service`)."""

    def __init__(self, store: FeatureStore, service: str | None = None, online_store: str | None = None):
        self.store = store
        self.service = service or CtrConf().llm_feature_service
        vectors = {f.key: f for f in service_fields(store, self.service) if f.dim}
        if set(vectors) != set(REQUEST_KEYS):
            raise FeatureStoreError(f"feature service {self.service!r} lacks a user or an item vector")
        check_materialized(store, list(vectors.values()))
        self.user_view, self.user_field = vectors["user_id"].view, vectors["user_id"].name
        self.item_view, self.item_field = vectors["item_id"].view, vectors["item_id"].name
        self.dim = vectors["item_id"].dim
        self._rows = rows_reader(store, online_store or configured_online_store(store))

    def fetch(self, user_id: str, item_ids: list[str]) -> RankingFeatures:
        requests = [
            (self.user_view, self.user_field, "user_id", [user_id]),
            (self.item_view, self.item_field, "item_id", list(item_ids)),
        ]
        try:
            user_rows, item_rows = self._rows.read(requests)
        except sqlite3.OperationalError as err:  # the table is created by apply, filled by materialize
            raise FeatureStoreError(f"online table is missing ({err}): {MATERIALIZE_HINT}") from None
        user, user_missing = decode_vectors(user_rows, self.dim)
        items, item_missing = decode_vectors(item_rows, self.dim)
        return RankingFeatures(user[0], items, bool(user_missing[0]), item_missing)


class HttpFeatures:
    """The same request against `feast serve`: one POST of a feature service for 1 user x N items."""

    def __init__(self, url: str, service: str | None = None, dim: int = 64, timeout_s: float = 5.0):
        self.url = url.rstrip("/") + "/get-online-features"
        self.service, self.dim, self.timeout_s = service or CtrConf().llm_feature_service, dim, timeout_s

    def request_body(self, user_id: str, item_ids: list[str]) -> bytes:
        # Feast answers one value per entity row: the user id goes on the first row only, so its vector comes
        # back once instead of N times (half the response, about half the server's time per request).
        if not item_ids:
            raise ValueError("a ranking request needs at least one candidate item")
        users = [user_id] + [""] * (len(item_ids) - 1)
        entities = {"user_id": users, "item_id": list(item_ids)}
        return json.dumps({"feature_service": self.service, "entities": entities}).encode()

    def fetch(self, user_id: str, item_ids: list[str]) -> RankingFeatures:
        req = urllib.request.Request(
            self.url, self.request_body(user_id, item_ids), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return parse_response(json.load(resp), len(item_ids), self.dim)


def parse_response(body: dict[str, Any], n: int, dim: int) -> RankingFeatures:
    """Feast's JSON (feature_names + one result per feature, one value per entity row) -> arrays."""
    names = body["metadata"]["feature_names"]
    columns = dict(zip(names, body["results"], strict=True))

    def vectors(name: str) -> tuple[np.ndarray, np.ndarray]:
        result = columns[name]
        found = np.array([s == "PRESENT" for s in result["statuses"]], dtype=bool)
        out = np.zeros((n, dim), dtype=np.float32)
        if found.any():
            out[found] = np.array(
                [v for v, f in zip(result["values"], found, strict=True) if f], dtype=np.float32
            )
        return out, ~found

    user, user_missing = vectors("user_vector")
    items, item_missing = vectors("item_vector")
    return RankingFeatures(user[0], items, bool(user_missing[0]), item_missing)
