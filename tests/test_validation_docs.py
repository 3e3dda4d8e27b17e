"""Data Docs: the page a gate run writes renders in headless Chromium, and an MLflow run links to it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from llmfeat.delta_io import RustDelta
from llmfeat.validation import GateFailed, gate, raw_suite
from llmfeat.validation.data_docs import find_chromium, link_to_mlflow, page_path, render

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tables = RustDelta(tmp_path_factory.mktemp("lake") / "delta")
    items = pd.DataFrame({"item_id": ["1", "2", "2"], "title": ["a", "b", "c"], "year": 1995, "text": "t"})
    with pytest.raises(GateFailed) as err:
        gate(items, raw_suite("items"), table="items", tables=tables, run_id="ingest-docs")
    return err.value.report


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (make system-deps installs it)")
def test_data_docs_page_renders_in_headless_chromium(failed_run, tmp_path: Path) -> None:
    from PIL import Image

    page = page_path(failed_run.docs_page)
    assert page is not None and page.is_file()
    png = tmp_path / "data_docs.png"
    dom = render(page, screenshot=png, size=(1280, 1000))
    assert "expect_column_values_to_be_unique" in dom or "values must be unique" in dom.lower()
    assert "ingest-docs" in dom
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 1000)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 20  # styled text and tables, not a blank page
    runs = render(page_path(failed_run.docs_index))  # type: ignore[arg-type]
    assert "ingest-docs" in runs and "FAILED" in runs and "pandas-items" in runs


def test_mlflow_run_links_to_its_data_docs(failed_run, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("ctr", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    link_to_mlflow(client, run.info.run_id, failed_run)
    client.set_terminated(run.info.run_id)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["data_docs.items"] == failed_run.docs_page
    assert tags["validation.items"].startswith("failed (items, run ingest-docs)")
    assert tags["data_docs"].endswith("data_docs/runs.html")
