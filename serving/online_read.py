"""The ranking request's read path: one vector field of a few feature views, for 1 + N entity ids, straight
from the online store's rows into float32 arrays.

Feast's `online_read` serialises every entity key, reads every feature and timestamp of a view and parses each
value into a protobuf; for 101 keys that is most of a 2-4 ms fetch. Here, for the SQLite and Redis stores:
  - serialised keys are cached per id (they never change);
  - only the requested field is read (SQLite: one SELECT per view; Redis: one server-side script for the
    whole request, a single command and round trip);
  - values are decoded without protobuf objects: a `FloatList` of D floats always serialises to the same
    header followed by D little-endian floats, so the rows are joined and viewed as one [N, D] array. A value
    with any other header (another dimension, another type) goes through the protobuf parser instead.
Keys, table names and field hashes come from the store's own helpers, so the layout is Feast's; the tests read
the same rows through Feast's `online_read` and compare. Other online stores use `online_read` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

# One view's request: (view, field, join key, entity ids).
Request = tuple["FeatureView", str, str, Sequence[str]]


@lru_cache(maxsize=1 << 20)
def entity_key(join_key: str, value: str, version: int) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
    return serialize_entity_key(key, entity_key_serialization_version=version)


@lru_cache(maxsize=64)
def float_list_header(dim: int) -> bytes:
    """The bytes a serialised `Value(float_list_val=[D floats])` starts with; D * 4 float bytes follow."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    return Value(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()[: -4 * dim]


def decode_vectors(values: Sequence[bytes | None], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Serialised Value protos (None: not found) -> ([N, D] float32, zero rows where missing; [N] missing)."""
    from feast.protos.feast.types.Value_pb2 import Value

    out = np.zeros((len(values), dim), dtype=np.float32)
    missing = np.ones(len(values), dtype=bool)
    header = float_list_header(dim)
    size = len(header) + 4 * dim
    plain = [i for i, v in enumerate(values) if v is not None and len(v) == size and v.startswith(header)]
    if plain:
        joined = b"".join(values[i] for i in plain)  # type: ignore[misc]
        out[plain] = np.ndarray((len(plain), dim), "<f4", joined, offset=len(header), strides=(size, 4))
        missing[plain] = False
    for i in set(range(len(values))) - set(plain):
        if values[i] is None:
            continue
        value = Value.FromString(values[i])
        if value.HasField("float_list_val"):
            floats = value.float_list_val.val
            if len(floats) != dim:
                raise ValueError(f"online vector of dimension {len(floats)}, expected {dim}")
            out[i], missing[i] = floats, False
    return out, missing


class SqliteRows:
    def __init__(self, store: FeatureStore):
        from feast.infra.online_stores.sqlite import _quote_id, _table_id

        self.config = store.config
        self.online: Any = cast(Any, store._get_provider().online_store)  # connects on the first read
        versioned = store.config.registry.enable_online_feature_view_versioning
        self.table = lambda view: _quote_id(_table_id(store.config.project, view, versioned))

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        out = []
        version = self.config.entity_key_serialization_version
        for view, field, join_key, ids in requests:
            keys = [entity_key(join_key, i, version) for i in ids]
            sql = (
                f"SELECT entity_key, value FROM {self.table(view)} "
                f"WHERE feature_name = ? AND entity_key IN ({','.join('?' * len(keys))})"
            )
            found = dict(self.online._get_conn(self.config).execute(sql, [field, *keys]).fetchall())
            out.append([found.get(k) for k in keys])
        return out


# One field of many hashes in one command: a pipeline of 101 HGETs costs ~1 ms in redis-py's per-command
# packing and parsing alone. ARGV holds (field, count) pairs, one per view, over consecutive KEYS.
HGET_MANY = """
local out, k = {}, 1
for j = 1, #ARGV, 2 do
  for _ = 1, tonumber(ARGV[j + 1]) do
    out[k] = redis.call('HGET', KEYS[k], ARGV[j])
    k = k + 1
  end
end
return out
"""


class RedisRows:
    """A single Redis server (not a cluster: the keys of one request live in many slots)."""

    def __init__(self, store: FeatureStore):
        from feast.infra.online_stores.redis import _versioned_fv_name

        self.config = store.config
        self.online: Any = cast(Any, store._get_provider().online_store)
        self.hget_many = self.online._get_client(store.config.online_store).register_script(HGET_MANY)
        self.project = store.config.project.encode()
        self.view_name = lambda view: _versioned_fv_name(view, store.config)

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        version = self.config.entity_key_serialization_version
        keys: list[bytes] = []
        args: list[Any] = []
        for view, field, join_key, ids in requests:
            _, (hashed, _ts) = self.online._generate_hset_keys_for_features(
                view, [field], fv_name_override=self.view_name(view)
            )
            keys += [entity_key(join_key, i, version) + self.project for i in ids]
            args += [hashed, len(ids)]
        values = self.hget_many(keys=keys, args=args)
        out, start = [], 0
        for *_, ids in requests:
            out.append(values[start : start + len(ids)])
            start += len(ids)
        return out


class FeastRows:
    """Any other online store: its own `online_read`, values re-serialised for the shared decoder."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.online: Any = cast(Any, store._get_provider().online_store)

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        out = []
        for view, field, join_key, ids in requests:
            keys = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=i)]) for i in ids]
            rows = self.online.online_read(self.store.config, view, keys, [field])
            # an unknown key comes back as no row (SQLite) or as an empty Value (Redis): both None here
            values = [v[field].SerializeToString() if v and field in v else b"" for _, v in rows]
            out.append([v or None for v in values])
        return out


def rows_reader(store: FeatureStore) -> Any:
    """The fastest reader for the store's online store type."""
    online = store._get_provider().online_store
    kind = type(online).__name__
    if kind == "SqliteOnlineStore":
        return SqliteRows(store)
    cfg = store.config.online_store
    client = getattr(getattr(cfg, "client", None), "value", "redis")
    single = getattr(getattr(cfg, "redis_type", None), "value", "redis") == "redis"
    if kind == "RedisOnlineStore" and single and client != "glide":  # GLIDE batches off the GIL already
        return RedisRows(store)
    return FeastRows(store)
