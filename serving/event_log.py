"""The ranking service's event log: one compact JSON line per ranking request (what was shown) and per click.

    log = EventLog(folder)            # one writer per process; several processes may share the folder
    log.append({"type": "impression", "request_id": ..., "items": [top slots], ...})   # O(1), no I/O
    log.close()                       # flushes, closes the open segment
    read_events(folder)               # every complete line of every segment, oldest segment first

Lines are buffered in memory and written by a background thread in batches: when `flush_every` lines wait or
`flush_interval_s` has passed, whichever comes first; each batch is one write and one fsync, so a crash loses
at most the unflushed lines. A request never waits for the disk. Batches go to an open segment
`.events-<start>-<pid>-<seq>.jsonl.open`, renamed to `events-<start>-<pid>-<seq>.jsonl` once it holds
`segment_bytes` or is `segment_s` old (and on close): a few files an hour instead of one per batch. Readers
take closed segments and, with include_open (the default), the open ones up to their last complete line. When
the disk falls behind, at most `max_pending` lines wait; more are dropped and counted (`dropped`, on /health),
so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

PATTERN = "events-*.jsonl"
OPEN_PATTERN = ".events-*.jsonl.open"


class EventLog:
    def __init__(
        self,
        folder: Path,
        flush_every: int = 1000,
        flush_interval_s: float = 2.0,
        segment_bytes: int = 64 << 20,
        segment_s: float = 3600.0,
        max_pending: int = 100_000,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self.segment_bytes, self.segment_s, self.max_pending = segment_bytes, segment_s, max_pending
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the buffer
        self._write_lock = threading.Lock()  # the segment
        self._segment: IO[str] | None = None
        self._segment_path: Path | None = None
        self._segment_started = 0.0
        self._seq = 0
        self.written = 0  # lines on disk
        self.dropped = 0  # lines refused because max_pending were waiting
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-log-flush", daemon=True)
        self._thread.start()

    def append(self, *events: dict[str, Any]) -> None:
        with self._lock:
            room = self.max_pending - len(self._buffer)
            if room < len(events):
                self.dropped += len(events) - max(room, 0)
                events = events[: max(room, 0)]
            self._buffer.extend(events)
            full = len(self._buffer) >= self.flush_every
        if full:
            self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def flush(self) -> int:
        """Write what is buffered as one batch (one write, one fsync); returns the number of lines."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if batch:
                text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in batch)
                segment = self._open_segment()
                segment.write(text)
                segment.flush()
                os.fsync(segment.fileno())
                self.written += len(batch)
            if self._segment is not None and (
                self._segment.tell() >= self.segment_bytes
                or time.monotonic() - self._segment_started >= self.segment_s
            ):
                self._close_segment()
            return len(batch)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        with self._write_lock:
            self._close_segment()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except OSError as err:  # a full or failing disk: keep serving, say so, try again
                log.error("event log flush to %s failed: %s", self.folder, err)

    def _open_segment(self) -> IO[str]:
        if self._segment is None:
            self._seq += 1
            name = f"events-{time.time_ns()}-{os.getpid()}-{self._seq:06d}.jsonl"
            self._segment_path = self.folder / name
            self._segment = open(self.folder / f".{name}.open", "a", encoding="utf-8")
            self._segment_started = time.monotonic()
        return self._segment

    def _close_segment(self) -> None:
        if self._segment is None or self._segment_path is None:
            return
        self._segment.close()
        os.replace(self._segment.name, self._segment_path)
        _fsync_dir(self.folder)  # the rename itself survives a crash
        self._segment, self._segment_path = None, None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_events(folder: Path, include_open: bool = True) -> Iterator[dict[str, Any]]:
    """Every complete line of every segment, by segment start time; a torn last line (a crash or a write in
    progress in an open segment) is skipped."""
    paths = list(Path(folder).glob(PATTERN))
    if include_open:
        paths += Path(folder).glob(OPEN_PATTERN)
    for path in sorted(paths, key=lambda p: p.name.lstrip(".")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    yield json.loads(line)
