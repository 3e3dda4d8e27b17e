"""What a gate found: the report every job gets back, and the error that stops a commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmfeat.errors import UserError


class GateFailed(UserError, ValueError):
    """A table failed its suite: nothing was committed. `report` holds the failures."""

    def __init__(self, report: GateReport):
        super().__init__(report.summary())
        self.report = report


@dataclass(frozen=True)
class Failure:
    expectation: str  # "expect_column_values_to_be_between(column=vector__dim, min_value=8, ...)"
    detail: str  # "2 of 10 rows" or "observed 0.0"
    row_ids: tuple[int, ...] = ()  # empty for a table-level failure: the whole batch is implicated
    examples: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class GateReport:
    table: str
    suite: str
    run_id: str
    success: bool
    rows: int
    expectations: int
    failures: tuple[Failure, ...] = ()
    docs_page: str | None = None  # this run's Data Docs page (file:// URL)
    docs_index: str | None = None
    quarantine: str | None = None  # where the rejected rows went
    quarantined: int = 0
    version: int | None = field(default=None)  # the table's current version, kept by a failure

    def summary(self) -> str:
        if self.success:
            return (
                f"{self.table}: {self.expectations} expectations passed on {self.rows:,} rows ({self.suite})"
            )
        kept = "new table not created" if self.version is None else f"table stays at version {self.version}"
        lines = [
            f"validation failed for table {self.table!r} (suite {self.suite}, run {self.run_id}): "
            f"{len(self.failures)} of {self.expectations} expectations failed; nothing committed, {kept}; "
            f"{self.quarantined} row(s) quarantined in {self.quarantine}"
        ]
        for f in self.failures:
            lines.append(f"  - {f.expectation}: {f.detail}")
            lines += [f"      e.g. {_short(e)}" for e in f.examples]
        if self.docs_page:
            lines.append(f"  Data Docs: {self.docs_page}")
        return "\n".join(lines)


def _short(row: dict[str, Any], width: int = 200) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in row.items())
    return text if len(text) <= width else text[: width - 3] + "..."
