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
) -> pa.Table:
    """The rejected rows of a validated batch (it carries ROW_ID) as quarantine records."""
    rows = _spark_rows(batch, row_reasons, table_reasons) if is_spark(batch) else batch
    if not is_spark(batch) and not table_reasons:
        rows = batch[batch[ROW_ID].isin(list(row_reasons))]
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


def _spark_rows(batch: Any, row_reasons: dict[int, list[str]], table_reasons: list[str]) -> pd.DataFrame:
    """Only the rejected rows leave the executors (all of them for a table-level failure)."""
    if table_reasons:
        return batch.toPandas()
    from pyspark.sql import functions as F

    ids = batch.sparkSession.createDataFrame([(i,) for i in row_reasons], f"{ROW_ID} long")
    return batch.join(F.broadcast(ids), ROW_ID, "inner").toPandas()


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dt.datetime | dt.date | pd.Timestamp):
        return value.isoformat()
    return str(value)
