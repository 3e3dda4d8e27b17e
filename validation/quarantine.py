"""The quarantine table: rows a gate rejected, with why, so that nothing a failed job saw is lost.

One Delta table for every gated table (<data_dir>/delta/quarantine by default), appended to on each failure:

    quarantined_at  when the gate ran (UTC)
    run_id, table, suite
    reasons         every failed expectation that names this row ("; "-separated); a table-level failure
                    (label rate, drift) names every row of the batch
    row_key         the row's key columns as JSON
    row             the whole row as JSON (vectors included), derived check columns left out
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmfeat.validation.derived import ROW_ID, is_derived, is_spark

SCHEMA = pa.schema(
    [
        ("quarantined_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("table", pa.string()),
        ("suite", pa.string()),
        ("reasons", pa.string()),
        ("row_key", pa.string()),
        ("row", pa.string()),
    ]
)


def quarantine_rows(
    batch: Any,
    keys: tuple[str, ...],
    row_reasons: dict[int, list[str]],
    table_reasons: list[str],
    meta: dict[str, str],
) -> Any:
    """The rejected rows of a validated batch (it carries ROW_ID) as quarantine records: an Arrow table, or
    for a Spark batch a Spark frame of the same schema (the rows never leave the executors)."""
    if is_spark(batch):
        return _spark_records(batch, keys, row_reasons, table_reasons, meta)
    rows = batch if table_reasons else batch[batch[ROW_ID].isin(list(row_reasons))]
    columns = [c for c in rows.columns if not is_derived(c)]
    records = rows[columns + [ROW_ID]].to_dict(orient="records")
    now = dt.datetime.now(dt.UTC)
    out = {name: [] for name in SCHEMA.names}  # type: dict[str, list[Any]]
    for rec in records:
        row_id = int(rec.pop(ROW_ID))
        out["quarantined_at"].append(now)
        for name in ("run_id", "table", "suite"):
            out[name].append(meta[name])
        out["reasons"].append("; ".join(row_reasons.get(row_id, []) + table_reasons))
        out["row_key"].append(json.dumps({k: rec.get(k) for k in keys}, default=_json_value))
        out["row"].append(json.dumps(rec, default=_json_value))
    return pa.Table.from_pydict(out, schema=SCHEMA)


def _spark_records(
    batch: Any,
    keys: tuple[str, ...],
    row_reasons: dict[int, list[str]],
    table_reasons: list[str],
    meta: dict[str, str],
) -> Any:
    """Spark twin of the records: the failing rows (all of them for a table-level failure) joined with their
    reasons, as JSON written by Spark. Only the failing rows' ids, which the gate reported, come from here."""
    from pyspark.sql import functions as F

    spark = batch.sparkSession
    reasons = spark.createDataFrame(
        [(i, "; ".join(r)) for i, r in row_reasons.items()], f"{ROW_ID} long, row_reasons string"
    )
    rows = batch.join(F.broadcast(reasons), ROW_ID, "left" if table_reasons else "inner")
    columns = [c for c in batch.columns if not is_derived(c)]
    as_json = {"ignoreNullFields": "false"}
    return rows.select(
        F.lit(dt.datetime.now(dt.UTC)).cast("timestamp").alias("quarantined_at"),
        *[F.lit(meta[name]).alias(name) for name in ("run_id", "table", "suite")],
        F.concat_ws("; ", "row_reasons", F.lit("; ".join(table_reasons) or None).cast("string")).alias(
            "reasons"
        ),
        F.to_json(F.struct(*[F.col(k) for k in keys if k in columns]), as_json).alias("row_key"),
        F.to_json(F.struct(*[F.col(c) for c in columns]), as_json).alias("row"),
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dt.datetime | dt.date | pd.Timestamp):
        return value.isoformat()
    return str(value)
