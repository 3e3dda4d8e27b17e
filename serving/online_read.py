"""The ranking request's read path: the fields of a few feature views, for 1 + N entity ids, straight from the
online store's rows (vectors into float32 arrays, scalars through a memo of their serialised bytes).

Feast's `online_read` serialises every entity key, reads every feature and timestamp of a view and parses each
value into a protobuf; for 101 keys that is most of a 2-4 ms fetch. Here, for the SQLite and Redis stores:
  - serialised keys are cached per id (they never change);
  - only the requested fields are read (SQLite: one SELECT per view; Redis: one server-side script for the
    whole request, a single command and round trip, one HMGET per entity over all its views);
  - values are decoded without protobuf objects: a `FloatList` of D floats always serialises to the same
    header followed by D little-endian floats, so the rows are joined and viewed as one [N, D] array. A value
    with any other header (another dimension, another type) goes through the protobuf parser instead;
  - SQLite rows are remembered until they change: the candidates of one request are mostly the items of the
    last ones. `PRAGMA data_version` (checked on every read) moves with any other connection's commit; only
    then is `llmfeat_table_generation` read, a counter per online table that triggers on the table bump on
    every insert, update and delete, whoever writes (a materialization, a pushed event), and for the tables
    whose counter moved, `llmfeat_changed_keys` names the entity keys written since (the triggers keep each
    key's newest counter): only those are forgotten. So an event pushed every few milliseconds (it writes
    one user's and one item's state) leaves the other 99 candidates' state remembered. Redis has no such
    signal: always read.
Which reader is the setting `feast.online_store` (sqlite or redis), checked against the online store Feast
built. Keys, table names and field hashes come from the store's own helpers, so the layout is Feast's; the
tests read the same rows through Feast's `online_read` and compare. A Redis cluster or sentinel goes through
`online_read` itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from llmfeat.feast_repo import FeatureStoreError

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

# One view's request: (view, field, join key, entity ids).
Request = tuple["FeatureView", str, str, Sequence[str]]
# The same with several fields of the view: (view, fields, join key, entity ids).
FieldsRequest = tuple["FeatureView", Sequence[str], str, Sequence[str]]
# Per FieldsRequest: field -> one serialised Value (None: not found) per entity id.
FieldRows = dict[str, list["bytes | None"]]


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


class ScalarDecoder:
    """Serialised scalar Values -> Python values (None where missing or unset), memoised by their bytes: the
    same counter, year or genre string arrives again and again, and a dict hit costs a tenth of a parse."""

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self._memo: dict[bytes, Any] = {}

    def __call__(self, values: Sequence[bytes | None]) -> list[Any]:
        memo = self._memo
        out: list[Any] = []
        for raw in values:
            if raw is None:
                out.append(None)
                continue
            value = memo.get(raw, memo)
            if value is memo:
                value = _scalar(raw)
                if len(memo) >= self.max_entries:  # bounded memory: start over
                    memo.clear()
                memo[raw] = value
            out.append(value)
        return out


def _scalar(raw: bytes) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value

    value = Value.FromString(raw)
    kind = value.WhichOneof("val")
    return None if kind is None or kind == "null_val" else getattr(value, kind)


GENERATIONS = "llmfeat_table_generation"
CHANGED_KEYS = "llmfeat_changed_keys"  # (table, entity key) -> the table's counter at its last write
TRIGGER_PREFIX = "llmfeat_key_"


class SqliteRows:
    """Rows of the SQLite online store, remembered per entity key until it changes (see the module docstring):
    triggers count every write to a table the reader has read and note the key written, and a read whose
    `PRAGMA data_version` moved compares the counters and forgets the keys written since. A table dropped
    and created again (feast apply) loses its triggers: they are installed again and the table forgotten.
    At most `max_entries` (key, field) values are kept."""

    def __init__(self, store: FeatureStore, max_entries: int = 250_000):
        from feast.infra.online_stores.sqlite import _quote_id, _table_id

        self.config = store.config
        self.online: Any = cast(Any, store._get_provider().online_store)  # connects on the first read
        versioned = store.config.registry.enable_online_feature_view_versioning
        self.table = lambda view: _quote_id(_table_id(store.config.project, view, versioned))
        self.max_entries = max_entries
        self._known: dict[tuple[str, str], dict[bytes, bytes | None]] = {}  # (table, field) -> key -> value
        self._entries = 0
        self._data_version: int | None = None
        self._generations: dict[str, int] = {}  # table -> its counter when last compared
        self._watched: set[str] = set()  # tables with triggers installed by this reader

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        return single_fields(self, requests)

    def read_fields(self, requests: Sequence[FieldsRequest]) -> list[FieldRows]:
        out = []
        version = self.config.entity_key_serialization_version
        conn = self.online._get_conn(self.config)
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version != self._data_version:
            self._data_version = data_version
            self._forget_changed(conn)
        if self._entries > self.max_entries:
            self._known.clear()
            self._entries = 0
        for view, fields, join_key, ids in requests:
            table = self.table(view)
            if table not in self._watched:
                self._watch(conn, table)
            known = [self._known.setdefault((table, f), {}) for f in fields]
            keys = [entity_key(join_key, i, version) for i in ids]
            unknown = _not_in_all(keys, known)
            if unknown:
                self._select(conn, table, fields, list(unknown), known)
            out.append({f: [values[k] for k in keys] for f, values in zip(fields, known, strict=True)})
        return out

    def _forget(self, table: str, keys: Sequence[bytes] | None = None) -> None:
        """Forget `keys` of `table` (None: all of it)."""
        for field_key in [k for k in self._known if k[0] == table]:
            values = self._known[field_key]
            if keys is None:
                self._entries -= len(self._known.pop(field_key))
                continue
            known = [key for key in keys if key in values]
            for key in known:
                del values[key]
            self._entries -= len(known)

    def _forget_changed(self, conn: Any) -> None:
        """Forget the keys written since the last comparison, and the tables whose triggers are gone."""
        if not self._watched:
            return
        try:
            counters = dict(conn.execute(f"SELECT table_name, generation FROM {GENERATIONS}").fetchall())
        except sqlite3.OperationalError:  # the counters are gone (a new database file): start over
            counters = {}
        triggers = {r[0] for r in conn.execute("SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' "
                                               f"AND name LIKE '{TRIGGER_PREFIX}%'")}  # fmt: skip
        for table in list(self._watched):
            name = _unquoted(table)
            now, then = counters.get(name), self._generations.get(table)
            if name not in triggers or now is None or then is None or now < then:
                self._watched.discard(table)  # nothing says what it holds now: watched again at its next read
                self._forget(table)
            elif now != then:
                sql = f"SELECT entity_key FROM {CHANGED_KEYS} WHERE table_name = ? AND generation > ?"
                self._forget(table, [r[0] for r in conn.execute(sql, (name, then))])
                self._generations[table] = now

    def _watch(self, conn: Any, table: str) -> None:
        """Install the triggers on `table` (idempotent) and forget what was read of it before."""
        name = _unquoted(table)
        literal = name.replace("'", "''")
        bump = f"UPDATE {GENERATIONS} SET generation = generation + 1 WHERE table_name = '{literal}';"
        try:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {GENERATIONS} (table_name TEXT PRIMARY KEY, generation "
                         "INTEGER NOT NULL)")  # fmt: skip
            conn.execute(f"CREATE TABLE IF NOT EXISTS {CHANGED_KEYS} (table_name TEXT, entity_key BLOB, "
                         "generation INTEGER NOT NULL, PRIMARY KEY (table_name, entity_key))")  # fmt: skip
            conn.execute(f"CREATE INDEX IF NOT EXISTS {CHANGED_KEYS}_since ON {CHANGED_KEYS} "
                         "(table_name, generation)")  # fmt: skip
            conn.execute(f"INSERT OR IGNORE INTO {GENERATIONS} VALUES ('{literal}', 0)")
            for event, row in (("INSERT", "NEW"), ("UPDATE", "OLD"), ("DELETE", "OLD")):
                older = _quoted(f"llmfeat_gen_{event.lower()}_{name}")  # counter only, no key: replaced
                conn.execute(f"DROP TRIGGER IF EXISTS {older}")
                note = (
                    f"INSERT INTO {CHANGED_KEYS} SELECT '{literal}', {row}.entity_key, generation FROM "
                    f"{GENERATIONS} WHERE table_name = '{literal}' ON CONFLICT (table_name, entity_key) "
                    "DO UPDATE SET generation = excluded.generation;"
                )
                trigger = _quoted(f"{TRIGGER_PREFIX}{event.lower()}_{name}")
                conn.execute(
                    f"CREATE TRIGGER IF NOT EXISTS {trigger} AFTER {event} ON {table} BEGIN {bump} {note} END"
                )
            conn.commit()
        except sqlite3.OperationalError:  # no such table yet (apply not run): read as before, watch later
            conn.rollback()
            return
        self._watched.add(table)
        self._forget(table)
        row = conn.execute(f"SELECT generation FROM {GENERATIONS} WHERE table_name = ?", (name,)).fetchone()
        self._generations[table] = row[0] if row else 0

    def _select(
        self,
        conn: Any,
        table: str,
        fields: Sequence[str],
        keys: list[bytes],
        known: list[dict[bytes, bytes | None]],
    ) -> None:
        sql = (
            f"SELECT entity_key, feature_name, value FROM {table} "
            f"WHERE feature_name IN ({','.join('?' * len(fields))}) "
            f"AND entity_key IN ({','.join('?' * len(keys))})"
        )
        for values in known:
            values.update(dict.fromkeys(keys))  # None: not in the store
        by_field = dict(zip(fields, known, strict=True))
        for key, name, value in conn.execute(sql, [*fields, *keys]):
            by_field[name][key] = value
        self._entries += len(keys) * len(fields)


def _unquoted(table: str) -> str:
    return table[1:-1].replace('""', '"') if table.startswith('"') else table


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _not_in_all(keys: list[bytes], known: list[dict[bytes, bytes | None]]) -> set[bytes]:
    wanted = set(keys)
    return set().union(*(wanted.difference(values) for values in known))


# Some fields of many hashes in one command: a pipeline of 101 HGETs costs ~1 ms in redis-py's per-command
# packing and parsing alone. ARGV holds groups (key count, field count, fields...) over consecutive KEYS; the
# reply is flat: per key, its fields in order (nil where absent).
HMGET_MANY = """
local out, k, j = {}, 1, 1
while j <= #ARGV do
  local n, m = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  local fields = {unpack(ARGV, j + 2, j + 1 + m)}
  for _ = 1, n do
    local values = redis.call('HMGET', KEYS[k], unpack(fields))
    for f = 1, m do
      out[#out + 1] = values[f]
    end
    k = k + 1
  end
  j = j + 2 + m
end
return out
"""


class RedisRows:
    """A single Redis server (not a cluster: the keys of one request live in many slots)."""

    def __init__(self, store: FeatureStore):
        from feast.infra.online_stores.redis import _versioned_fv_name

        self.config = store.config
        self.online: Any = cast(Any, store._get_provider().online_store)
        self.hmget_many = self.online._get_client(store.config.online_store).register_script(HMGET_MANY)
        self.project = store.config.project.encode()
        self.view_name = lambda view: _versioned_fv_name(view, store.config)

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        return single_fields(self, requests)

    def read_fields(self, requests: Sequence[FieldsRequest]) -> list[FieldRows]:
        """Views of one entity share its hash (one HMGET per id over all of them); one script call in all."""
        version = self.config.entity_key_serialization_version
        groups: dict[tuple[str, tuple[str, ...]], list[tuple[int, list[bytes]]]] = {}
        for r, (view, fields, join_key, ids) in enumerate(requests):
            _, hset_keys = self.online._generate_hset_keys_for_features(
                view, list(fields), fv_name_override=self.view_name(view)
            )
            hashed = hset_keys[:-1]  # the last one is the view's timestamp
            groups.setdefault((join_key, tuple(ids)), []).append((r, hashed))
        keys: list[bytes] = []
        args: list[Any] = []
        for (join_key, ids), members in groups.items():
            keys += [entity_key(join_key, i, version) + self.project for i in ids]
            args += [len(ids), sum(len(h) for _, h in members), *(f for _, h in members for f in h)]
        values = self.hmget_many(keys=keys, args=args)
        out: list[FieldRows] = [{} for _ in requests]
        start = 0
        for (_, ids), members in groups.items():
            width = sum(len(h) for _, h in members)
            offset = 0
            for r, hashed in members:
                for f, name in enumerate(requests[r][1]):
                    column = start + offset + f
                    out[r][name] = values[column : start + width * len(ids) : width]
                offset += len(hashed)
            start += width * len(ids)
        return out


class FeastRows:
    """Feast's own `online_read` (a Redis cluster or sentinel; the tests' reference), values re-serialised for
    the shared decoder."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.online: Any = cast(Any, store._get_provider().online_store)

    def read(self, requests: Sequence[Request]) -> list[list[bytes | None]]:
        return single_fields(self, requests)

    def read_fields(self, requests: Sequence[FieldsRequest]) -> list[FieldRows]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        out = []
        for view, fields, join_key, ids in requests:
            keys = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=i)]) for i in ids]
            rows = self.online.online_read(self.store.config, view, keys, list(fields))
            # an unknown key comes back as no row (SQLite) or as an empty Value (Redis): both None here
            out.append(
                {
                    f: [(v[f].SerializeToString() or None) if v and f in v else None for _, v in rows]
                    for f in fields
                }
            )
        return out


def single_fields(reader: Any, requests: Sequence[Request]) -> list[list[bytes | None]]:
    """One field per view: `read_fields` with a single field each."""
    rows = reader.read_fields([(view, [field], key, ids) for view, field, key, ids in requests])
    return [r[field] for r, (_, field, *_) in zip(rows, requests, strict=True)]


def rows_reader(store: FeatureStore, online_store: str) -> SqliteRows | RedisRows | FeastRows:
    """The fastest reader for the online store that the settings name (`feast.online_store`: sqlite or redis).
    The store must be the one Feast built from those settings (feast_repo.open_store): a store of another
    kind fails here, naming the setting, rather than being read with the wrong reader."""
    check_online_store(store, online_store)
    if online_store == "sqlite":
        return SqliteRows(store)
    cfg = store.config.online_store
    if cfg.redis_type.value == "redis" and cfg.client.value != "glide":  # GLIDE batches off the GIL already
        return RedisRows(store)
    return FeastRows(store)  # a Redis cluster or sentinel (one request's keys in many slots), or GLIDE


def check_online_store(store: FeatureStore, online_store: str) -> None:
    """Fails unless Feast built the online store that `feast.online_store` names."""
    expected: type
    if online_store == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStore

        expected = SqliteOnlineStore
    elif online_store == "redis":
        from feast.infra.online_stores.redis import RedisOnlineStore

        expected = RedisOnlineStore
    else:
        raise FeatureStoreError(f"feast.online_store is {online_store!r}; expected sqlite or redis")
    built = store._get_provider().online_store
    if not isinstance(built, expected):
        raise FeatureStoreError(
            f"feast.online_store is {online_store!r}, but the feature store was built with "
            f"{type(built).__name__} (online_store type {store.config.online_store.type!r}): open the store "
            "from the same settings (llmfeat.feast_repo.open_store), or set feast.online_store to match it"
        )


def configured_online_store(store: FeatureStore) -> str:
    """sqlite or redis, as the store's own config names it: for a caller with a store but no settings."""
    kind = str(store.config.online_store.type)
    return {"feast.infra.online_stores.sqlite.SqliteOnlineStore": "sqlite"}.get(kind, kind)
