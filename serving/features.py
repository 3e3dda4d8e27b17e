"""Online features for one ranking request: 1 user + N candidate items, in one call, as arrays.

    features = OnlineFeatures(open_store(settings))          # SQLite or Redis, from feature_store.yaml
    batch = features.fetch("196", ["242", "302", ...])       # RankingFeatures
    batch.user     [D] float32     batch.user_missing  bool
    batch.items    [N, D] float32  batch.item_missing  [N] bool   (unknown ids: zeros + flag)
    user, items, item_missing = batch.to_torch()

`OnlineFeatures` reads only the vector field of the user and item views, with cached entity keys, in one
SQLite query per view or one Redis pipeline per request, and decodes the stored values straight into arrays
(serving/online_read.py); Feast's generic `get_online_features` returns the same values as Python lists
(bench/retrieval_latency.py measures both).
`HttpFeatures` fetches the same arrays from `feast serve` (POST /get-online-features).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmfeat.feast_repo import FeatureStoreError, vector_dim
from llmfeat.serving.online_read import decode_vectors, rows_reader

if TYPE_CHECKING:
    import torch
    from feast import FeatureStore, FeatureView

MATERIALIZE_HINT = "run `llmfeat features materialize` (after `llmfeat compress`)"


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
    """In-process retrieval from the configured online store (SQLite or Redis)."""

    def __init__(self, store: FeatureStore, user_view: str = "user_llm_fv", item_view: str = "item_llm_fv"):
        self.store = store
        self.user_view, self.user_field = self._view(user_view)
        self.item_view, self.item_field = self._view(item_view)
        self.dim = vector_dim(self.item_view)
        self._rows = rows_reader(store)

    def _view(self, name: str) -> tuple[FeatureView, str]:
        try:
            view = self.store.get_feature_view(name)
        except Exception as err:
            raise FeatureStoreError(
                f"feature view {name!r} is not in the registry: run `llmfeat features apply`"
            ) from err
        if not view.materialization_intervals:
            raise FeatureStoreError(f"feature view {name!r} has never been materialized: {MATERIALIZE_HINT}")
        field = next(f.name for f in view.schema if f.name.endswith("_vector"))
        return view, field

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

    def __init__(self, url: str, service: str = "ctr_marc_v1", dim: int = 64, timeout_s: float = 5.0):
        self.url = url.rstrip("/") + "/get-online-features"
        self.service, self.dim, self.timeout_s = service, dim, timeout_s

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
