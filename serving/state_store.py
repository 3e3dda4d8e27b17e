"""Fresh state in the online store: events in, the same update the batch job runs, states out.

    state = OnlineState.open(settings, store)                   # over state.item_version, else marc.alias's
    result = state.push([Event("e1", "196", "242", 1, at_us)])  # PushResult: applied, duplicates, refused
    write_newer(state.backend, view, "user_id", rows)           # materialization: never older over newer

Rules (every backend):
- Per-user transactions: a user's events are read, updated and written in one transaction with the items
  they touch (SQLite: BEGIN IMMEDIATE, the database's write lock; Redis: WATCH the user's and items' hashes,
  MULTI/EXEC, retried when another writer got there first), so concurrent workers never lose an update.
- Idempotent: the ids of applied events are kept with their times (SQLite table `llmfeat_applied_events`,
  Redis sorted set `llmfeat:applied-at:<view>:<user key>`), in the same transaction; an id seen again is a
  duplicate. Only those within `state.event_id_window_s` (a day) of the user's newest event are kept: an event
  older than the newest is refused by the ordering rule anyway, so a user holds at most a window of ids
  however long it lives, and a batch re-sent within the window is reported as duplicates.
- Ordered: an event strictly older than the user's newest is refused with its reason; an equal time is
  applied. An item's counters take events in any order (counts commute).
- The rows are Feast's own layout (the SQLite table per view, the Redis hash per entity with `_ts:<view>`),
  so `get_online_features`, the ranking service's reader and materialization all see the same values. Feast's
  push path is not used: its Redis writer skips a value stamped in the same second as the stored one, and
  neither store reads and writes one entity in a transaction.

An item without a vector (launched after the last encode) counts as a zero vector in the user's means, as it
does in the batch job. The state's smoothing (base rate, prior weight, half-life) is the one the batch job
stored with its table (`state_prior`), so both sides compute the same numbers.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from llmfeat.errors import UserError
from llmfeat.models.ctr.state import (
    State,
    StateConfig,
    empty,
    from_row,
    item_from_row,
    item_row,
    to_row,
    update,
)
from llmfeat.reprs import ITEM_STATE_VIEW, STATE_LINEAGE, STATE_PRIOR_TABLE, MarcView, UserStateView
from llmfeat.serving.online_read import check_online_store, decode_vectors, entity_key, rows_reader

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

    from llmfeat.config import Settings

APPLIED_TABLE = "llmfeat_applied_events"
WAL_LIMIT_BYTES = 64 << 20  # the WAL file left after a restart of the log (PRAGMA journal_size_limit)
WAL_RESTART_FRAMES = 4096  # ~16 MiB of log (one block of its index): then the log is made to start over
RESTART_WAIT_S = 0.02  # how long that RESTART (pushes wait behind it) waits for readers; else the next round
TimedIds = Sequence[tuple[str, int]]  # (event id, event time in µs)
VECTOR_FIELDS = {"liked_mean", "disliked_mean", "liked_recent_mean", "disliked_recent_mean"}
TEXT_FIELDS = {"representation", "representation_version"}
FLOAT_FIELDS = {"like_rate", "liked_recent_weight", "disliked_recent_weight"}


class EventError(UserError, ValueError):
    """An event that cannot be applied as given (a bad label, id or time): names the event and the field."""


@dataclass(frozen=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    label: int  # 1 liked / clicked, 0 not
    at_us: int  # epoch microseconds

    @classmethod
    def parse(cls, raw: Mapping[str, Any], now_us: int | None = None) -> Event:
        """From a JSON object (event_id, user_id, item_id, label, event_timestamp?): the timestamp as ISO 8601
        (no zone = UTC) or epoch seconds; server time when absent."""
        name = raw.get("event_id")
        for key in ("event_id", "user_id", "item_id"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
                raise EventError(f"event {name!r}: {key} must be a non-empty string, got {value!r}")
        label = raw.get("label")
        if label not in (0, 1) or isinstance(label, float):
            raise EventError(f"event {name!r}: label must be 0 or 1, got {label!r}")
        at = raw.get("event_timestamp")
        if at is None:
            at_us = now_us if now_us is not None else time.time_ns() // 1000
        else:
            at_us = parse_micros(name, at)
        return cls(str(raw["event_id"]), str(raw["user_id"]), str(raw["item_id"]), int(label), at_us)


def parse_micros(name: Any, value: Any) -> int:
    """A time as ISO 8601 (no zone = UTC), epoch seconds or a datetime -> exact epoch microseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(round(value * 1e6))
    if isinstance(value, str):
        try:
            return int(round(float(value) * 1e6))  # epoch seconds as text (a CSV column)
        except ValueError:
            pass
    if isinstance(value, datetime):
        at = value
    else:
        try:
            at = datetime.fromisoformat(str(value))
        except ValueError:
            raise EventError(
                f"event {name!r}: event_timestamp {value!r} is neither ISO 8601 nor epoch seconds"
            ) from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return int((at - EPOCH) / timedelta(microseconds=1))


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros_to_datetime(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(us))


@dataclass
class PushResult:
    applied: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # event id -> reason

    def add(self, other: PushResult) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.refused.update(other.refused)

    def as_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "duplicates": self.duplicates, "refused": self.refused}


# ------------------------------------------------------------------------------------------- value encoding


def encode_value(name: str, value: Any) -> bytes:
    """A state column -> the serialised Feast Value of the view's type."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    if name in VECTOR_FIELDS:
        return Value(float_list_val=FloatList(val=np.asarray(value, np.float32).tolist())).SerializeToString()
    if name in TEXT_FIELDS:
        return Value(string_val=str(value)).SerializeToString()
    if name in FLOAT_FIELDS:
        return Value(double_val=float(value)).SerializeToString()
    return Value(int64_val=int(value)).SerializeToString()


def decode_value(raw: bytes) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value

    value = Value.FromString(raw)
    kind = value.WhichOneof("val")
    if kind == "float_list_val":
        return np.asarray(value.float_list_val.val, dtype=np.float32)
    return None if kind in (None, "null_val") else getattr(value, kind)


# ---------------------------------------------------------------------------------------------- backends


class Transaction:
    """What an update needs from a store inside one transaction (SqliteState, RedisState)."""

    def prefetch(
        self, reads: Sequence[tuple[FeatureView, bytes]], seen: tuple[FeatureView, bytes, list[str]]
    ) -> None:
        """The reads the body will make, announced first (Redis: one round trip for all of them)."""

    def read(self, view: FeatureView, key: bytes) -> dict[str, Any] | None:
        raise NotImplementedError

    def seen(self, view: FeatureView, key: bytes, event_ids: Sequence[str]) -> set[str]:
        raise NotImplementedError

    def write(self, view: FeatureView, key: bytes, row: Mapping[str, Any], stamp: datetime) -> None:
        raise NotImplementedError

    def mark(self, view: FeatureView, key: bytes, events: TimedIds, keep_from_us: int) -> None:
        """Remember these (id, time in µs) as applied; forget the entity's ids timed before keep_from_us."""
        raise NotImplementedError


class WriterLock:
    """The online store's writers in every process, one at a time (flock on a file beside the database):
    a waiting push wakes as soon as the other commits, where SQLite's own busy handler sleeps 1, 2, 5,
    10 ms... between tries, holding the service's event loop all that time. One per open file: two of them
    exclude each other in one process too."""

    def __init__(self, db_path: str):
        self.fd = os.open(db_path + "-writer.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class SqliteState:
    """Feast's SQLite online store in WAL mode (a ranking read never waits on a push), written by transactions
    that hold the database's write lock from their first read (BEGIN IMMEDIATE)."""

    def __init__(
        self, store: FeatureStore, checkpoint_s: float = 1.0, restart_frames: int = WAL_RESTART_FRAMES
    ):
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id

        config = store.config
        self.path = SqliteOnlineStore._get_db_path(config)
        versioned = config.registry.enable_online_feature_view_versioning
        self.table = lambda view: _quote_id(_table_id(config.project, view, versioned))
        self.key_version = config.entity_key_serialization_version
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL's usual setting: no fsync per commit
        # A push never copies the WAL back itself (SQLite's automatic checkpoint would, every ~1000 pages:
        # a push in ~200 paid several ms); a thread does it every checkpoint_s (see _checkpoint).
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        # SQLite reuses the WAL file from its start and never shrinks it: after one large write (a
        # materialization) its pages fall out of the page cache, and a commit's frames (4 KiB + 24 bytes, so
        # never page-aligned) then wait on disk reads. Truncated to this size whenever the log restarts.
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {APPLIED_TABLE} (view TEXT, entity_key BLOB, event_id TEXT, "
            "at_us INTEGER, PRIMARY KEY (view, event_id))"
        )
        columns = {r[1] for r in self.conn.execute(f"PRAGMA table_info({APPLIED_TABLE})")}
        if "at_us" not in columns:  # a store written before ids had times: theirs count as old
            self.conn.execute(f"ALTER TABLE {APPLIED_TABLE} ADD COLUMN at_us INTEGER DEFAULT 0")
        self.conn.execute(
            f"CREATE INDEX IF NOT EXISTS {APPLIED_TABLE}_by_entity "
            f"ON {APPLIED_TABLE} (view, entity_key, at_us)"
        )
        self._lock = threading.Lock()  # one transaction at a time on this connection (pushes from threads)
        self._writer = WriterLock(self.path)
        self._closed = threading.Event()
        self._checkpoints = threading.Thread(
            target=self._checkpoint, args=(checkpoint_s, restart_frames), daemon=True
        )
        self._checkpoints.start()

    def _checkpoint(self, every_s: float, restart_frames: int) -> None:
        """Copy the WAL back every `every_s`, PASSIVE (a push never waits for it). Under a steady stream of
        pushes a commit always lands while it runs, so the log never starts over and grows without end, and
        every read searches more of it: once it holds `restart_frames`, a RESTART checkpoint with the writer
        lock held copies the few frames left and waits for the readers of older frames (each reads for about
        a millisecond) at most `RESTART_WAIT_S`; the next push then starts the log over."""
        conn = sqlite3.connect(self.path, timeout=RESTART_WAIT_S, isolation_level=None)
        writer = WriterLock(self.path)
        while not self._closed.wait(every_s):
            try:
                _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if frames >= restart_frames:
                    with writer:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            except sqlite3.Error:  # busy or the file went away: the next round tries again
                continue
        conn.close()
        writer.close()

    def close(self) -> None:
        """Stop the checkpointer (a state left open copies the WAL back every second for as long as its
        process lives) and close the connection."""
        self._closed.set()
        self._checkpoints.join(timeout=10)
        with self._lock:
            self.conn.close()
        self._writer.close()

    def key(self, join_key: str, value: str) -> bytes:
        return entity_key(join_key, value, self.key_version)

    def read_field(self, view: FeatureView, name: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """One field of many entities, on this connection (the service's reader is the event loop's)."""
        sql = (
            f"SELECT entity_key, value FROM {self.table(view)} WHERE feature_name = ? "
            f"AND entity_key IN ({','.join('?' * len(keys))})"
        )
        with self._lock:
            found = dict(self.conn.execute(sql, (name, *keys)).fetchall())
        return [found.get(k) for k in keys]

    def run(self, keys: Sequence[bytes], body: Callable[[Transaction], Any]) -> Any:
        with self._lock, self._writer:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                out = body(_SqliteTx(self))
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            return out


class _SqliteTx(Transaction):
    def __init__(self, backend: SqliteState):
        self.b = backend

    def read(self, view: FeatureView, key: bytes) -> dict[str, Any] | None:
        sql = f"SELECT feature_name, value FROM {self.b.table(view)} WHERE entity_key = ?"
        rows = self.b.conn.execute(sql, (key,)).fetchall()
        return {name: decode_value(value) for name, value in rows} or None

    def seen(self, view: FeatureView, key: bytes, event_ids: Sequence[str]) -> set[str]:
        marks = ",".join("?" * len(event_ids))
        sql = f"SELECT event_id FROM {APPLIED_TABLE} WHERE view = ? AND event_id IN ({marks})"
        return {r[0] for r in self.b.conn.execute(sql, (view.name, *event_ids))}

    def write(self, view: FeatureView, key: bytes, row: Mapping[str, Any], stamp: datetime) -> None:
        naive = stamp.astimezone(UTC).replace(tzinfo=None)
        created = datetime.now(UTC).replace(tzinfo=None)
        sql = (
            f"INSERT INTO {self.b.table(view)} (entity_key, feature_name, value, value_text, event_ts, "
            "created_ts) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts"
        )
        values = [
            (key, name, encode_value(name, v), str(v) if name in TEXT_FIELDS else None, naive, created)
            for name, v in row.items()
        ]
        self.b.conn.executemany(sql, values)

    def mark(self, view: FeatureView, key: bytes, events: TimedIds, keep_from_us: int) -> None:
        sql = f"DELETE FROM {APPLIED_TABLE} WHERE view = ? AND entity_key = ? AND at_us < ?"
        self.b.conn.execute(sql, (view.name, key, keep_from_us))
        sql = f"INSERT OR IGNORE INTO {APPLIED_TABLE} (view, entity_key, event_id, at_us) VALUES (?, ?, ?, ?)"
        self.b.conn.executemany(sql, [(view.name, key, e, at) for e, at in events])


class RedisState:
    """A single Redis server: one entity's views share a hash (Feast's layout), so a transaction WATCHes the
    hashes it reads and starts again when another writer changed one first."""

    def __init__(self, store: FeatureStore, max_retries: int = 100):
        from feast.infra.online_stores.redis import _mmh3, _versioned_fv_name

        config = store.config
        online: Any = cast(Any, store._get_provider().online_store)
        self.client = online._get_client(config.online_store)
        self.project = config.project.encode()
        self.key_version = config.entity_key_serialization_version
        self.view_name = lambda view: _versioned_fv_name(view, config)
        self.field = lambda view, name: _mmh3(f"{self.view_name(view)}:{name}")
        self.max_retries = max_retries

    def close(self) -> None:
        """Nothing of its own: the client is Feast's store's, shared with the readers."""

    def key(self, join_key: str, value: str) -> bytes:
        return entity_key(join_key, value, self.key_version) + self.project

    def applied_key(self, view: FeatureView, key: bytes) -> bytes:
        return b"llmfeat:applied-at:" + view.name.encode() + b":" + key  # id -> event time (µs)

    def run(self, keys: Sequence[bytes], body: Callable[[Transaction], Any]) -> Any:
        import redis

        for _ in range(self.max_retries):
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(*keys)
                    tx = _RedisTx(self, pipe)
                    out = body(tx)
                    pipe.multi()
                    for command in tx.writes:
                        command(pipe)
                    pipe.execute()
                    return out
                except redis.WatchError:
                    continue
        raise RuntimeError(f"gave up after {self.max_retries} conflicting writers on the same keys")


class _RedisTx(Transaction):
    def __init__(self, backend: RedisState, pipe: Any):
        self.b, self.pipe = backend, pipe
        self.writes: list[Callable[[Any], Any]] = []
        self._rows: dict[tuple[str, bytes], dict[str, Any] | None] = {}
        self._seen: dict[tuple[str, bytes], set[str]] = {}

    def prefetch(
        self, reads: Sequence[tuple[FeatureView, bytes]], seen: tuple[FeatureView, bytes, list[str]]
    ) -> None:
        """One pipeline for every read (the keys are WATCHed already, so a change since fails the EXEC)."""
        batch = self.b.client.pipeline(transaction=False)
        for view, key in reads:
            batch.hmget(key, [self.b.field(view, f.name) for f in view.features])
        view, key, ids = seen
        batch.zmscore(self.b.applied_key(view, key), ids)
        *rows, flags = batch.execute()
        for (v, k), values in zip(reads, rows, strict=True):
            self._rows[(v.name, k)] = self._decode(v, values)
        self._seen[(view.name, key)] = {e for e, f in zip(ids, flags, strict=True) if f is not None}

    def _decode(self, view: FeatureView, values: list[Any]) -> dict[str, Any] | None:
        names = [f.name for f in view.features]
        found = {n: decode_value(v) for n, v in zip(names, values, strict=True) if v is not None}
        return found or None

    def read(self, view: FeatureView, key: bytes) -> dict[str, Any] | None:
        if (view.name, key) in self._rows:
            return self._rows[(view.name, key)]
        return self._decode(view, self.pipe.hmget(key, [self.b.field(view, f.name) for f in view.features]))

    def seen(self, view: FeatureView, key: bytes, event_ids: Sequence[str]) -> set[str]:
        if (view.name, key) in self._seen:
            return self._seen[(view.name, key)] & set(event_ids)
        flags = self.pipe.zmscore(self.b.applied_key(view, key), list(event_ids))
        return {e for e, f in zip(event_ids, flags, strict=True) if f is not None}

    def write(self, view: FeatureView, key: bytes, row: Mapping[str, Any], stamp: datetime) -> None:
        from google.protobuf.timestamp_pb2 import Timestamp  # type: ignore[import-untyped]

        ts = Timestamp()
        ts.FromDatetime(stamp)
        mapping: dict[Any, bytes] = {f"_ts:{self.b.view_name(view)}": ts.SerializeToString()}
        mapping |= {self.b.field(view, name): encode_value(name, value) for name, value in row.items()}
        self.writes.append(lambda pipe: pipe.hset(key, mapping=mapping))

    def mark(self, view: FeatureView, key: bytes, events: TimedIds, keep_from_us: int) -> None:
        applied, scores = self.b.applied_key(view, key), {e: int(at) for e, at in events}
        self.writes.append(lambda pipe: pipe.zremrangebyscore(applied, "-inf", f"({keep_from_us}"))
        self.writes.append(lambda pipe: pipe.zadd(applied, scores))


def state_backend(store: FeatureStore, online_store: str) -> SqliteState | RedisState:
    """The writer for the online store that `feast.online_store` names (checked against Feast's)."""
    check_online_store(store, online_store)
    if online_store == "sqlite":
        return SqliteState(store)
    if store.config.online_store.redis_type.value != "redis":
        raise UserError("the event path needs a single Redis server (redis_type: redis), not a cluster")
    return RedisState(store)


def write_newer(
    backend: SqliteState | RedisState,
    view: FeatureView,
    join_key: str,
    rows: Iterable[Mapping[str, Any]],
    chunk: int = 500,
) -> int:
    """Write each entity's newest offline row unless the online one already holds its newest event or a
    later one: a pushed state is never replaced by an older batch state. `chunk` entities per transaction.
    -> rows written."""
    newest = "newest_event_us" if join_key == "user_id" else "item_newest_event_us"
    columns = [f.name for f in view.features]

    def body(tx: Transaction, batch: list[tuple[bytes, Mapping[str, Any]]]) -> int:
        written = 0
        for key, row in batch:
            online = tx.read(view, key)
            if online is not None and int(online.get(newest, -1)) >= int(row[newest]):
                continue
            tx.write(view, key, {c: row[c] for c in columns}, micros_to_datetime(int(row[newest]) + 1))
            written += 1
        return written

    def commit(batch: list[tuple[bytes, Mapping[str, Any]]]) -> int:
        return int(backend.run([k for k, _ in batch], lambda tx: body(tx, batch)))

    total, batch = 0, []
    for row in rows:
        batch.append((backend.key(join_key, str(row[join_key])), row))
        if len(batch) >= chunk:
            total, batch = total + commit(batch), []
    return total + (commit(batch) if batch else 0)


# ------------------------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class StateViews:
    """The views one event updates, and the item vectors the user's means are over."""

    user: FeatureView  # user_state_item_marc_v<N>_fv
    item: FeatureView  # item_state_fv
    vectors: FeatureView  # item_marc_v<N>_fv
    lineage: FeatureView  # item_marc_v<N>_lineage_fv (the tapped layer)
    version: str
    dim: int


def read_prior(settings: Settings, table: str) -> StateConfig:
    """The smoothing the batch job built `table` with (its row of state_prior)."""
    from llmfeat.delta_io import open_tables

    tables = open_tables(settings)
    if not tables.exists(STATE_PRIOR_TABLE):
        raise UserError(f"{STATE_PRIOR_TABLE} not found: run `llmfeat user-state` first")
    rows = [r for r in tables.read_arrow(STATE_PRIOR_TABLE).to_pylist() if r["table"] == table]
    if not rows:
        raise UserError(f"{STATE_PRIOR_TABLE} has no row for {table}: run `llmfeat user-state` first")
    return StateConfig(rows[0]["base_rate"], rows[0]["prior_weight"], rows[0]["half_life_s"])


def state_version(settings: Settings) -> str:
    """The item-vector version the state is over: state.item_version, else the one at marc.alias."""
    if settings.state.item_version is not None:
        return str(settings.state.item_version)
    from llmfeat.registry import resolve_alias

    return resolve_alias(settings, "items").version


class OnlineState:
    """The event path: `push` applies events to the user's and the items' state in the online store."""

    def __init__(
        self,
        store: FeatureStore,
        online_store: str,
        views: StateViews,
        cfg: StateConfig,
        id_window_s: int,
    ):
        self.views, self.cfg, self.id_window_us = views, cfg, id_window_s * 1_000_000
        self.backend = state_backend(store, online_store)
        self._rows = rows_reader(store, online_store) if online_store == "redis" else None

    @classmethod
    def open(cls, settings: Settings, store: FeatureStore, version: str | None = None) -> OnlineState:
        """The state over item vectors `version` (default: `state_version`); its views must be applied."""
        from llmfeat.feast_repo import FeatureStoreError, vector_dim

        version = version or state_version(settings)
        state_view, marc = UserStateView("item_marc", version), MarcView("item", version)
        names = (state_view.name, ITEM_STATE_VIEW, marc.name, marc.name.removesuffix("_fv") + "_lineage_fv")
        try:
            found = [store.get_feature_view(n) for n in names]
        except Exception as err:
            raise FeatureStoreError(
                f"the state views over item vectors v{version} are not applied ({err}): declare "
                f"{state_view.name} in feature_repo/feature_views.py and run `llmfeat features apply`"
            ) from None
        views = StateViews(found[0], found[1], found[2], found[3], version, vector_dim(found[2]))
        prior = read_prior(settings, state_view.table)
        return cls(store, settings.feast.online_store, views, prior, settings.state.event_id_window_s)

    def close(self) -> None:
        self.backend.close()

    def push(self, events: Sequence[Event]) -> PushResult:
        """Apply events: each user's in one transaction, in time order (stable for equal times)."""
        result = PushResult()
        by_user: dict[str, list[Event]] = {}
        for e in sorted(events, key=lambda e: e.at_us):
            by_user.setdefault(e.user_id, []).append(e)
        if not by_user:
            return result
        vectors, layers = self._item_vectors(sorted({e.item_id for e in events}))
        for user, mine in by_user.items():
            result.add(self._push_user(user, mine, vectors, layers))
        return result

    def read(self, view: FeatureView, join_key: str, value: str) -> dict[str, Any] | None:
        """One entity's stored state row (None: no event yet)."""
        key = self.backend.key(join_key, value)
        return cast("dict[str, Any] | None", self.backend.run([key], lambda tx: tx.read(view, key)))

    def _item_vectors(self, items: list[str]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        v = self.views
        if isinstance(self.backend, SqliteState):
            keys = [self.backend.key("item_id", i) for i in items]
            raw_vectors = self.backend.read_field(v.vectors, "item_vector", keys)
            raw_layers = self.backend.read_field(v.lineage, "layer", keys)
        else:  # Redis: the reader's script, one round trip (its client is safe across threads)
            assert self._rows is not None
            found = self._rows.read_fields(
                [(v.vectors, ["item_vector"], "item_id", items), (v.lineage, ["layer"], "item_id", items)]
            )
            raw_vectors, raw_layers = found[0]["item_vector"], found[1]["layer"]
        vectors, missing = decode_vectors(raw_vectors, v.dim)
        layers = {i: decode_value(raw) for i, raw in zip(items, raw_layers, strict=True) if raw}
        return {i: vectors[j] for j, i in enumerate(items) if not missing[j]}, layers

    def _push_user(
        self, user: str, events: list[Event], vectors: dict[str, np.ndarray], layers: dict[str, int]
    ) -> PushResult:
        b, v = self.backend, self.views
        user_key = b.key("user_id", user)
        item_keys = {e.item_id: b.key("item_id", e.item_id) for e in events}
        watched = [user_key, *item_keys.values()]
        if isinstance(b, RedisState):
            watched.append(b.applied_key(v.user, user_key))

        def body(tx: Transaction) -> PushResult:
            out = PushResult()
            reads = [(v.user, user_key), *((v.item, k) for k in item_keys.values())]
            tx.prefetch(reads, (v.user, user_key, [e.event_id for e in events]))
            row = tx.read(v.user, user_key)
            state = from_row(row) if row else empty(v.dim)
            seen = tx.seen(v.user, user_key, [e.event_id for e in events])
            fresh: list[Event] = []
            for e in events:
                if e.event_id in seen:
                    out.duplicates.append(e.event_id)
                elif e.at_us < state.newest_us:
                    out.refused[e.event_id] = (
                        f"event at {micros_to_datetime(e.at_us).isoformat()} is older than user {user}'s "
                        f"newest event ({micros_to_datetime(state.newest_us).isoformat()}); the online state "
                        "takes only later events (the batch job applies every event in order)"
                    )
                else:
                    seen.add(e.event_id)
                    fresh.append(e)
            if not fresh:
                return out
            zero = np.zeros(v.dim)
            for at, group in _by_time(fresh):
                labels = np.array([e.label for e in group])
                rows = np.stack([vectors.get(e.item_id, zero) for e in group])
                state = update(state, at, labels, rows, self.cfg)
            layer = next((layers[e.item_id] for e in fresh if e.item_id in layers), None)
            if layer is None:  # no item with a vector: keep what the row says
                layer = int(row["layer"]) if row and row.get("layer") is not None else -1
            lineage = dict(zip(STATE_LINEAGE, ("item_marc", v.version, layer), strict=True))
            tx.write(v.user, user_key, to_row(state, self.cfg) | lineage, _stamp(state))
            items: dict[str, State] = {}
            for e in fresh:
                if e.item_id not in items:
                    found = tx.read(v.item, item_keys[e.item_id])
                    items[e.item_id] = item_from_row(found) if found else empty(0)
                items[e.item_id] = update(
                    items[e.item_id], e.at_us, np.array([e.label]), np.zeros((1, 0)), self.cfg, ordered=False
                )
            for item, item_state in items.items():
                tx.write(v.item, item_keys[item], item_row(item_state), _stamp(item_state))
            keep_from = state.newest_us - self.id_window_us
            tx.mark(
                v.user, user_key, [(e.event_id, e.at_us) for e in fresh if e.at_us >= keep_from], keep_from
            )
            out.applied += [e.event_id for e in fresh]
            return out

        return cast(PushResult, b.run(watched, body))


def _by_time(events: list[Event]) -> list[tuple[int, list[Event]]]:
    groups: dict[int, list[Event]] = {}
    for e in events:
        groups.setdefault(e.at_us, []).append(e)
    return sorted(groups.items())


def _stamp(state: State) -> datetime:
    """A state row is stamped 1 microsecond after its newest event, online as offline."""
    return micros_to_datetime(state.newest_us + 1)
