"""Push job: a file of events through the online event path, as POST /events applies them one by one.

    llmfeat push EVENTS.jsonl [--config local|PATH] [--set key=value ...]
    spark-submit spark_jobs/push.py EVENTS.parquet --config conf/local.yaml

The file: JSON lines, CSV or Parquet with event_id, user_id, item_id, label and optionally event_timestamp
(ISO 8601 or epoch seconds; server time when absent). Every row is checked before anything is applied: a bad
one stops the job naming its line. Events are applied in time order, each user's in one transaction
(serving/state_store.py), `chunk` at a time; applied ones are appended to `pushed_events` (one Delta commit
per chunk), so the next `llmfeat user-state` includes them. A re-run applies nothing twice (duplicates are
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


def read_events(path: Path, batch_rows: int = CHUNK) -> Iterator[list[Event]]:
    """The file's events in batches; a bad row fails naming its line (1-based, after a CSV header)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    now_us = time.time_ns() // 1000  # one server time for the rows without a timestamp
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


def run(spark: SparkSession | None, settings: Settings, path: Path | str) -> PushSummary:
    """Apply the file's events; `spark` is unused (the event path writes the online store directly)."""
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store
    from llmfeat.serving.event_sink import append_events
    from llmfeat.serving.state_store import OnlineState

    path = Path(path)
    events = [e for batch in read_events(path) for e in batch]  # checked in full before any is applied
    state = OnlineState.open(settings, open_store(settings))
    tables = open_tables(settings)
    summary, started = PushSummary(len(events)), time.monotonic()
    events.sort(key=lambda e: e.at_us)
    for lo in range(0, len(events), CHUNK):
        chunk = events[lo : lo + CHUNK]
        result = state.push(chunk)
        applied = set(result.applied)
        append_events(tables, [e for e in chunk if e.event_id in applied])
        summary.result.add(result)
    summary.seconds = time.monotonic() - started
    return summary


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
