"""Push job: a file of events through the online event path, as POST /events applies them one by one.

    llmfeat push EVENTS.jsonl [--config local|PATH] [--set key=value ...]
    spark-submit spark_jobs/push.py EVENTS.parquet --config conf/local.yaml

The file: JSON lines, CSV or Parquet with event_id, user_id, item_id, label and optionally event_timestamp
(ISO 8601 or epoch seconds; server time when absent). The file is read twice, a batch at a time, so memory
stays bounded whatever its size: first every row is checked before anything is applied (a bad one stops the
job naming its line), then events are applied `CHUNK` rows at a time in file order, each chunk in time order
and each user's in one transaction (serving/state_store.py); applied ones are appended to `pushed_events`
(one Delta commit per chunk), so the next `llmfeat user-state` includes them. A user's events may be in any
order within a chunk; one older than the same user's event in an earlier chunk stops the check naming both
lines (sort the file by event_timestamp). A re-run applies nothing twice (duplicates are
counted, not applied). Events older than their user's newest state are refused and listed; the exit code is
then 1, after the rest were applied.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmfeat.config import Settings
from llmfeat.errors import UserError
from llmfeat.serving.state_store import Event, EventError, PushResult

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

CHUNK = 10_000


@dataclass
class PushSummary:
    events: int = 0
    result: PushResult = field(default_factory=PushResult)
    seconds: float = 0.0

    def __str__(self) -> str:
        r = self.result
        lines = [
            f"{self.events:,} events: {len(r.applied):,} applied, {len(r.duplicates):,} already applied, "
            f"{len(r.refused):,} refused ({self.seconds:.1f} s)"
        ]
        lines += [f"  refused {event}: {reason}" for event, reason in list(r.refused.items())[:10]]
        if len(r.refused) > 10:
            lines.append(f"  ... and {len(r.refused) - 10:,} more")
        return "\n".join(lines)


def read_events(path: Path, batch_rows: int = CHUNK, now_us: int | None = None) -> Iterator[list[Event]]:
    """The file's events in batches; a bad row fails naming its line (1-based, after a CSV header). Rows
    without a timestamp get `now_us` (default: the time of the call)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    out: list[Event] = []
    for line, row in enumerate(_rows(path, batch_rows), start=1):
        try:
            out.append(Event.parse(row, now_us))
        except EventError as err:
            raise EventError(f"{path}, line {line}: {err}") from None
        if len(out) >= batch_rows:
            yield out
            out = []
    if out:
        yield out


def _rows(path: Path, batch_rows: int) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open() as lines:
            for number, text in enumerate(lines, start=1):
                if text.strip():
                    try:
                        yield json.loads(text)
                    except json.JSONDecodeError as err:
                        raise EventError(f"{path}, line {number}: not JSON ({err})") from None
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        strings = {c: pa.string() for c in ("event_id", "user_id", "item_id", "event_timestamp")}
        batches = iter(pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=strings)))
    else:
        raise UserError(f"{path}: expected .jsonl, .csv or .parquet")
    for batch in batches:
        yield from batch.to_pylist()


def run(spark: SparkSession | None, settings: Settings, path: Path | str, chunk: int = CHUNK) -> PushSummary:
    """Apply the file's events; `spark` is unused (the event path writes the online store directly)."""
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store
    from llmfeat.serving.event_sink import append_events
    from llmfeat.serving.state_store import OnlineState

    path, now_us = Path(path), time.time_ns() // 1000  # one server time for rows without a timestamp
    count = check_file(path, chunk, now_us)  # every row, before any is applied
    state = OnlineState.open(settings, open_store(settings))
    tables = open_tables(settings)
    summary, started = PushSummary(count), time.monotonic()
    for events in read_events(path, chunk, now_us):
        result = state.push(events)
        applied = set(result.applied)
        append_events(tables, [e for e in events if e.event_id in applied])
        summary.result.add(result)
    summary.seconds = time.monotonic() - started
    return summary


def check_file(path: Path, chunk: int, now_us: int) -> int:
    """Check every row, and that no user's event is older than their event in an earlier chunk (it would be
    refused there): -> the number of events. Holds one chunk and each user's newest time."""
    newest: dict[str, tuple[int, int, int]] = {}  # user -> (time, line, chunk)
    count = 0
    for k, events in enumerate(read_events(path, chunk, now_us)):
        for e in events:
            count += 1
            held = newest.get(e.user_id)
            if held is not None and e.at_us < held[0] and held[2] < k:
                raise EventError(
                    f"{path}, line {count}: event {e.event_id!r} of user {e.user_id} is older than their "
                    f"event on line {held[1]}, in an earlier chunk (events are applied {chunk:,} rows at a "
                    "time, in file order): sort the file by event_timestamp"
                )
            if held is None or e.at_us >= held[0]:
                newest[e.user_id] = (e.at_us, count, k)
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("events", type=Path, help="a .jsonl, .csv or .parquet file of events")


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args

    parser = argparse.ArgumentParser(prog="llmfeat push", description=__doc__.splitlines()[0])
    config_args(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command(args)


def command(args: Any) -> int:
    from llmfeat.runner import run_in_process

    refused: list[str] = []

    def body(settings: Settings) -> None:
        summary = run(None, settings, args.events)
        print(summary)
        refused.extend(summary.result.refused)

    code = run_in_process("push", args.config, args.overrides, body)
    return code or (1 if refused else 0)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.push import main as package_main

    sys.exit(package_main())
