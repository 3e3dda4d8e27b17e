"""The ranking service's event log: impressions and clicks, one JSON object per line, flushed in batches.

Each flush writes one new file `events-<time>-<seq>.jsonl`: the batch goes to a hidden temporary file in the
same folder, is fsynced, renamed into place (atomic on POSIX) and the folder is fsynced. A reader therefore
sees whole batches or nothing, never a half-written line; a crash loses at most the events not yet flushed
(at most `flush_every` events or `flush_interval_s` seconds). Readers skip the temporary files.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PATTERN = "events-*.jsonl"


class EventLog:
    def __init__(self, folder: Path, flush_every: int = 200, flush_interval_s: float = 2.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._seq = 0
        self.written = 0  # events on disk
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_periodically, name="event-log-flush", daemon=True)
        self._timer.start()

    def append(self, *events: dict[str, Any]) -> None:
        with self._lock:
            self._buffer.extend(events)
            full = len(self._buffer) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered events as one new file; returns its path (None when nothing was buffered)."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return None
            self._seq += 1
            name = f"events-{time.time_ns()}-{os.getpid()}-{self._seq:06d}.jsonl"
            path = write_atomically(self.folder / name, "".join(json.dumps(e) + "\n" for e in batch))
            self.written += len(batch)
            return path

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._timer.join(timeout=5)
        self.flush()


def write_atomically(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
    return path


def read_events(folder: Path) -> Iterator[dict[str, Any]]:
    """Every event of every completed batch file, in file order (temporary files are skipped)."""
    for path in sorted(Path(folder).glob(PATTERN)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
