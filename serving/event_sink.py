"""Applied events appended to the events Delta table (`pushed_events`), so the next batch run includes them.

    sink = EventSink(tables)          # one per process; a background thread writes
    sink.append(events)               # O(1), no I/O on the request path
    sink.close()                      # the last batch reaches the table

Batches are appended when `flush_every` events wait or `flush_interval_s` has passed: one Delta commit per
batch (appends from several processes do not conflict). Only applied events are appended, and an event id is
applied once (serving/state_store.py), so the table holds each event once; the batch job also keeps one row
per event id. A crash loses at most the unflushed batch from the table, never from the online state; the
batch job then lacks those events, and a refresh keeps the newer online state (it never writes over it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from llmfeat.reprs import EVENTS_TABLE
from llmfeat.serving.state_store import Event, micros_to_datetime

if TYPE_CHECKING:
    from llmfeat.delta_io import DeltaTables

log = logging.getLogger(__name__)

TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int32()),
        ("event_timestamp", TIMESTAMP),
        ("received_at", TIMESTAMP),
    ]
)


def events_table(events: Sequence[Event], received_at: datetime | None = None) -> pa.Table:
    received = received_at or datetime.now(UTC)
    return pa.table(
        {
            "event_id": [e.event_id for e in events],
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "label": [e.label for e in events],
            "event_timestamp": [micros_to_datetime(e.at_us) for e in events],
            "received_at": [received] * len(events),
        },
        schema=SCHEMA,
    )


def append_events(tables: DeltaTables, events: Sequence[Event]) -> int:
    """One Delta commit appending these events -> the table's new version (-1: nothing to append)."""
    if not events:
        return -1
    return tables.append(EVENTS_TABLE, events_table(events))


class EventSink:
    def __init__(self, tables: DeltaTables, flush_every: int = 500, flush_interval_s: float = 1.0):
        self.tables, self.flush_every, self.flush_interval_s = tables, flush_every, flush_interval_s
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self.written = 0
        self.failed = 0  # events of batches the table refused (logged; they stay in the online state)
        self._thread = threading.Thread(target=self._run, name="event-sink", daemon=True)
        self._thread.start()

    def append(self, events: Sequence[Event]) -> None:
        with self._lock:
            self._pending.extend(events)
            full = len(self._pending) >= self.flush_every
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        started = time.monotonic()
        try:
            append_events(self.tables, batch)
            self.written += len(batch)
        except Exception as err:  # keep serving; the events are in the online state and in the log line
            self.failed += len(batch)
            log.error("appending %d events to %s failed: %s", len(batch), EVENTS_TABLE, err)
        log.debug("appended %d events in %.3f s", len(batch), time.monotonic() - started)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
