"""Data Docs: the HTML report of every gate run, where to find it, and how to look at it.

One great-expectations site per data_dir (<data_dir>/data_docs by default). Each gate run adds one page,
validations/<suite>/<run_id>/<time>/<engine>-<table>.html. Validation results are kept as JSON beside it, so
the site's runs.html lists every run of every job: plain HTML that reads offline (GX's own index.html, which
fills its list with JavaScript from public CDNs and re-reads every stored result, is not built). The MLflow
run that used a table carries tags pointing at its page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from great_expectations.data_context import EphemeralDataContext

    from llmfeat.config import Settings
    from llmfeat.validation.report import GateReport

SITE = "llmfeat"
RESULTS = "_results"  # validation results (JSON) the index is built from


def docs_context(docs_dir: Path) -> EphemeralDataContext:
    """An in-memory GX context whose validation results and Data Docs site live under `docs_dir`.

    In memory so that no great_expectations.yml is written and two jobs never race on it; results on disk
    so that the index a job rebuilds still lists the runs of every other job.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    config.stores["validation_results_store"] = {
        "class_name": "ValidationResultsStore",
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(docs_dir / RESULTS),
        },
    }
    config.data_docs_sites = {
        SITE: {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            # validation pages through a view that compiles GX's templates once per process (gx_views.py)
            "site_section_builders": {
                "validations": {
                    "view": {
                        "module_name": "llmfeat.validation.gx_views",
                        "class_name": "CompiledOncePageView",
                    }
                }
            },
        }
    }
    return gx.get_context(mode="ephemeral", project_config=config)


def page_path(url: str | None) -> Path | None:
    return Path(url.removeprefix("file://")) if url else None


def link_to_mlflow(client: Any, mlflow_run_id: str, *reports: GateReport) -> dict[str, str]:
    """Tag the MLflow run that used these tables with their Data Docs pages and gate outcomes."""
    tags: dict[str, str] = {}
    for r in reports:
        tags[f"data_docs.{r.table}"] = r.docs_page or ""
        tags[f"validation.{r.table}"] = f"{'passed' if r.success else 'failed'} ({r.suite}, run {r.run_id})"
        if r.docs_index:
            tags["data_docs"] = r.docs_index
    for key, value in tags.items():
        client.set_tag(mlflow_run_id, key, value)
    return tags


def latest_gate_pages(docs_dir: Path, tables: Sequence[str]) -> dict[str, tuple[str, bool, str]]:
    """table -> (Data Docs page URL, passed, gate run) of the table's newest gate run in this site."""
    import json

    newest: dict[str, tuple[str, Path]] = {}
    for result in (docs_dir / RESULTS).glob("*/*/*/*.json"):
        _suite, _run, when, batch = result.relative_to(docs_dir / RESULTS).with_suffix("").parts
        table = batch.split("-", 1)[-1]  # "<pandas|spark>-<table>"
        if table in tables and (table not in newest or when > newest[table][0]):
            newest[table] = (when, result)
    out = {}
    for table, (_, result) in newest.items():
        suite, run, when, batch = result.relative_to(docs_dir / RESULTS).with_suffix("").parts
        page = docs_dir / "validations" / suite / run / when / f"{batch}.html"
        out[table] = (page.as_uri(), bool(json.loads(result.read_text()).get("success")), run)
    return out


def link_inputs(client: Any, mlflow_run_id: str, docs_dir: Path, tables: Sequence[str]) -> dict[str, str]:
    """Tag a run with the newest gate page of each table it read (gated when the table was published)."""
    tags = {}
    for table, (page, passed, run) in latest_gate_pages(docs_dir, tables).items():
        tags[f"data_docs.input.{table}"] = page
        tags[f"validation.input.{table}"] = f"{'passed' if passed else 'failed'} (run {run})"
    for key, value in tags.items():
        client.set_tag(mlflow_run_id, key, value)
    return tags


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def chromium_args(chromium: str, profile_dir: str) -> list[str]:
    """Headless, offline, no first-run work: nothing leaves the machine and nothing waits on the network."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",  # runs as root in containers
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
    ]


def render(page: Path, *, screenshot: Path | None = None, size: tuple[int, int] = (1280, 1000)) -> str:
    """Load a Data Docs page in headless Chromium; returns the rendered DOM, writes a PNG if asked."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found: apt-get install chromium (or make system-deps)")
    with tempfile.TemporaryDirectory(prefix="llmfeat-chromium-") as profile:
        args = chromium_args(chromium, profile)
        env = {**os.environ, "HOME": profile}  # chromium writes caches under $HOME
        if screenshot is not None:
            cmd = [*args, f"--window-size={size[0]},{size[1]}", f"--screenshot={screenshot}", page.as_uri()]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=env)
        dom = subprocess.run(
            [*args, "--dump-dom", page.as_uri()],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    return dom.stdout


def locations(settings: Settings) -> tuple[Path, Path]:
    """(the runs page listing every gate's Data Docs page, quarantine table) for a configuration."""
    docs = Path(settings.validation.docs_dir)
    docs = docs if docs.is_absolute() else Path(settings.data_dir) / docs
    return docs / RUNS_PAGE, settings.delta_root / settings.validation.quarantine_table


def where_note(settings: Settings) -> str:
    """What the demo prints: where each gate's report and rejected rows are."""
    index, quarantine = locations(settings)
    shown = index.as_uri() if index.exists() else f"{index} (no run yet)"
    lines = [f"Data Docs (one page per gate run): {shown}"]
    if (quarantine / "_delta_log").is_dir():
        from deltalake import DeltaTable

        rows = DeltaTable(str(quarantine)).to_pyarrow_dataset().count_rows()
        lines.append(f"quarantine: {quarantine} ({rows:,} rejected rows so far)")
    else:
        lines.append(f"quarantine: {quarantine} (empty: no gate has failed)")
    return "\n".join(lines)


RUNS_PAGE = "runs.html"


def write_runs_page(docs_dir: Path) -> Path:
    """runs.html: every gate run, newest first, linking each table's GX page; plain HTML that reads offline
    (GX's own index.html builds its list with JavaScript from public CDNs, so it is empty without network)."""
    import html
    import json

    runs: dict[str, list[tuple[str, str, bool, str]]] = {}
    for result in sorted((docs_dir / RESULTS).glob("*/*/*/*.json")):
        suite, run, when, batch = result.relative_to(docs_dir / RESULTS).with_suffix("").parts
        doc = json.loads(result.read_text())
        stats = doc.get("statistics", {})
        summary = f"{stats.get('successful_expectations', '?')}/{stats.get('evaluated_expectations', '?')}"
        page = f"validations/{suite}/{run}/{when}/{batch}.html"
        runs.setdefault(run, []).append((batch, page, bool(doc.get("success")), summary))
    rows = []
    for run in sorted(runs, key=lambda r: max(p for _, p, _, _ in runs[r]), reverse=True):
        for batch, page, ok, summary in runs[run]:
            status = '<b style="color:#080">passed</b>' if ok else '<b style="color:#b00">FAILED</b>'
            rows.append(
                f"<tr><td>{html.escape(run)}</td>"
                f"<td><a href='{html.escape(page)}'>{html.escape(batch)}</a></td>"
                f"<td>{status}</td><td>{summary}</td></tr>"
            )
    body = "\n".join(rows) or "<tr><td colspan=4>no gate has run yet</td></tr>"
    out = docs_dir / RUNS_PAGE
    out.write_text(
        "<!doctype html><meta charset='utf-8'><title>llmfeat validation runs</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 12px;border-bottom:1px solid #ddd}"
        "th{text-align:left}</style><h1>Validation runs</h1>"
        "<p>One row per gated table per run; each links to its great-expectations Data Docs page.</p>"
        f"<table><tr><th>run</th><th>table</th><th>gate</th><th>expectations met</th></tr>\n{body}</table>\n"
    )
    return out
