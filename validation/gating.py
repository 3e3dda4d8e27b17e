"""The gate every job runs before it commits a table.

    report = gate(frame, suite, table="items_repr", tables=delta_tables, run_id=run_id)
    tables.upsert("items_repr", frame, keys)   # reached only when every expectation passed

`frame` is a Spark DataFrame (jobs), a pandas DataFrame or a pyarrow Table (small tables). On failure the gate
writes the failing rows with their reasons to the quarantine table, renders the run's Data Docs page and
raises `GateFailed`, whose message names each failed expectation with example rows; the caller's commit is
never reached, so the previous table version stays current, and `llmfeat` exits non-zero.

A Spark frame is validated on the executors (great-expectations' Spark batch): the driver gets counts,
observed values and, on failure, the failing rows' ids and a few example rows; the quarantined rows go from
the executors to the quarantine table.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmfeat.config import ValidationConf
from llmfeat.validation.data_docs import SITE, docs_context, write_runs_page
from llmfeat.validation.derived import ROW_ID, is_spark, with_derived, with_row_id
from llmfeat.validation.quarantine import quarantine_rows
from llmfeat.validation.report import Failure, GateFailed, GateReport

if TYPE_CHECKING:
    from great_expectations.core import ExpectationValidationResult

    from llmfeat.delta_io import DeltaTables
    from llmfeat.validation.suites import Suite

log = logging.getLogger(__name__)
DEFAULTS = ValidationConf()
PAGE_EXAMPLES = 20  # unexpected values a failed expectation's Data Docs page lists (GX's own default)
# Expectation arguments worth naming in a message; the rest (batch id, result format) is noise.
SHOWN_KWARGS = (
    "column", "column_list", "column_A", "column_B", "min_value", "max_value", "value_set", "row_condition",
)  # fmt: skip


def new_run_id(job: str) -> str:
    """A run id that sorts by time and names the job: ingest-20250101T120000Z-1a2b3c."""
    return f"{job}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def docs_dir_for(tables: DeltaTables, conf: ValidationConf) -> Path:
    """Data Docs live beside the lake: <data_dir>/<docs_dir> (tables.root is <data_dir>/delta)."""
    path = Path(conf.docs_dir)
    return path if path.is_absolute() else tables.root.parent / path


def gate(
    data: Any,
    suite: Suite,
    *,
    table: str,
    tables: DeltaTables,
    run_id: str,
    conf: ValidationConf = DEFAULTS,
) -> GateReport:
    """Validate `data` against `suite`; return the report, or quarantine, report and raise GateFailed."""
    batch = _prepared(data, suite)
    try:
        return _validate(batch, suite, table, tables, run_id, conf)
    finally:
        if is_spark(batch):
            batch.unpersist()


def _prepared(data: Any, suite: Suite) -> Any:
    if isinstance(data, pa.Table):
        data = data.to_pandas()
    if suite.prepare is not None:
        data = suite.prepare(data)
    return with_row_id(with_derived(data, suite.derived))


def _validate(
    batch: Any, suite: Suite, table: str, tables: DeltaTables, run_id: str, conf: ValidationConf
) -> GateReport:
    import great_expectations as gx

    docs_dir = docs_dir_for(tables, conf)
    context = docs_context(docs_dir)
    source = (
        context.data_sources.add_spark("spark")
        if is_spark(batch)
        else context.data_sources.add_pandas("pandas")
    )
    batch_definition = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("batch")
    gx_suite = context.suites.add(suite.gx_suite())
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=table, data=batch_definition, suite=gx_suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{table}_gate",
            validation_definitions=[definition],
            # BASIC: counts and observed values, no unexpected values kept (GX still runs its capped
            # unexpected-values query per map expectation: on Spark, one small query each). The failed
            # expectations are validated again for their rows' ids and examples (_with_row_ids).
            result_format={"result_format": "BASIC", "partial_unexpected_count": 0},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": batch}, run_id=gx.RunIdentifier(run_name=run_id))
    (identifier, validation), *_ = result.run_results.items()
    rows = batch.count() if is_spark(batch) else len(batch)  # cached: no recomputation
    failed = [r for r in validation.results if not r.success]
    if failed:
        failed = _with_row_ids(
            batch_definition.get_batch({"dataframe": batch}), gx_suite, failed, suite, conf
        )
        shown = {r.expectation_config.id: _for_page(r) for r in failed if r.expectation_config}
        validation.results = [shown.get(r.expectation_config.id, r) if r.expectation_config else r
                              for r in validation.results]  # fmt: skip
        context.validation_results_store.set(identifier, validation)
    # This run's page only: GX's UpdateDataDocsAction also re-renders the suite's page and the site index
    # (read from every stored result), and runs.html is the index that reads offline (write_runs_page).
    context.build_data_docs(site_names=[SITE], resource_identifiers=[identifier], build_index=False)
    urls = context.get_docs_sites_urls(resource_identifier=identifier, site_name=SITE)
    failures = tuple(_failure(r, suite.keys, conf) for r in failed)
    report = GateReport(
        table=table,
        suite=suite.name,
        run_id=run_id,
        success=bool(validation.success),
        rows=rows,
        expectations=len(validation.results),
        failures=failures,
        docs_page=urls[0]["site_url"] if urls else None,
        docs_index=write_runs_page(docs_dir).as_uri(),
        version=tables.version(table),
    )
    if report.success:
        log.info("%s", report.summary())
        return report
    quarantined = _quarantine(batch, suite, report, tables, conf)
    raise GateFailed(_replace(report, quarantine=tables.path(conf.quarantine_table), quarantined=quarantined))


def _with_row_ids(
    batch: Any, gx_suite: Any, failed: list[ExpectationValidationResult], suite: Suite, conf: ValidationConf
) -> list[ExpectationValidationResult]:
    """The failed expectations validated again, returning their failing rows' row ids and keys.

    SUMMARY caps the ids at max_failing_ids per expectation (COMPLETE would collect every failing row's ids
    from the executors). An expectation that could not be evaluated keeps its first result.
    """
    fmt = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": conf.max_failing_ids,
        "unexpected_index_column_names": [ROW_ID, *suite.keys],
    }
    by_id = {e.id: e for e in gx_suite.expectations}
    again = []
    for r in failed:
        config = r.expectation_config
        evaluated = config is not None and not _exception(r.exception_info or {})
        again.append(batch.validate(by_id[config.id], result_format=fmt) if config and evaluated else r)
    return again


def _for_page(r: ExpectationValidationResult) -> ExpectationValidationResult:
    """A failed expectation's result as its Data Docs page shows it: its first PAGE_EXAMPLES unexpected
    values, without the row ids (up to max_failing_ids of them)."""
    from great_expectations.core import ExpectationValidationResult

    shown = {k: v for k, v in (r.result or {}).items() if "index" not in k}
    for key in ("partial_unexpected_list", "partial_unexpected_counts"):
        if isinstance(shown.get(key), list):
            shown[key] = shown[key][:PAGE_EXAMPLES]
    return ExpectationValidationResult(
        success=r.success, expectation_config=r.expectation_config, result=shown, meta=r.meta,
        exception_info=r.exception_info,
    )  # fmt: skip


def _failure(r: ExpectationValidationResult, keys: tuple[str, ...], conf: ValidationConf) -> Failure:
    config = r.expectation_config
    assert config is not None
    shown = {k: _plain(v) for k, v in config.kwargs.items() if k in SHOWN_KWARGS and v is not None}
    name = f"{config.type}({', '.join(f'{k}={v}' for k, v in shown.items())})"
    if error := _exception(r.exception_info or {}):  # e.g. a column the suite expects is missing
        return Failure(name, f"could not be evaluated: {error}")
    res = r.result or {}
    index = res.get("partial_unexpected_index_list") or []
    if "unexpected_count" in res and index:
        ids = tuple(int(i[ROW_ID]) for i in index)
        shown_rows = tuple(_example(i, keys) for i in index[: conf.examples])
        detail = f"{res['unexpected_count']} of {res.get('element_count')} rows"
        if res["unexpected_count"] > len(ids):  # not every failing row is known here: the batch is implicated
            detail += f" (more than validation.max_failing_ids={conf.max_failing_ids:,}: quarantined whole)"
            ids = ()
        return Failure(name, detail, ids, shown_rows)
    return Failure(name, f"observed {_plain(res.get('observed_value'))}")


def _exception(info: dict[str, Any]) -> str | None:
    """The first error message in GX's exception_info, flat or keyed by metric."""
    found = [info] + [v for v in info.values() if isinstance(v, dict)]
    for entry in found:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message") or "error").splitlines()[0]
    return None


def _example(index_row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The row's keys first, then the value the expectation checked."""
    ordered = [k for k in keys if k in index_row] + [k for k in index_row if k not in keys and k != ROW_ID]
    return {k: _plain(index_row[k]) for k in ordered}


def _quarantine(
    batch: Any, suite: Suite, report: GateReport, tables: DeltaTables, conf: ValidationConf
) -> int:
    row_reasons: dict[int, list[str]] = {}
    table_reasons = []
    for f in report.failures:
        if f.row_ids:
            for i in f.row_ids:
                row_reasons.setdefault(i, []).append(f.expectation)
        else:
            table_reasons.append(f"{f.expectation}: {f.detail}")
    meta = {"run_id": report.run_id, "table": report.table, "suite": report.suite}
    records = quarantine_rows(batch, suite.keys, row_reasons, table_reasons, meta)
    n = records.count() if is_spark(records) else records.num_rows  # Spark: the rows stay on the executors
    if n:
        tables.write(conf.quarantine_table, records, mode="append")
    log.warning("%s: %d row(s) quarantined in %s", report.table, n, conf.quarantine_table)
    return n


def _replace(report: GateReport, **changes: Any) -> GateReport:
    from dataclasses import replace

    return replace(report, **changes)


def _plain(value: Any) -> Any:
    """numpy / pandas scalars as plain Python values, so messages read `3`, not `np.int64(3)`."""
    if isinstance(value, dt.datetime | pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if type(value).__module__.startswith("great_expectations"):  # a row condition
        return str(value)
    return value
