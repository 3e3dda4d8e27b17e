"""The ranking-request fetch on a real redis-server and over HTTP from `feast serve` (no Spark needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from test_feast_repo import DIM, feature_table, tiny_settings, vectors_for

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_repo import FeatureStoreError, apply_repo, open_store
from llmfeat.serving.features import HttpFeatures, OnlineFeatures
from llmfeat.serving.local_servers import feast_serve, redis_server
from llmfeat.serving.online_read import FeastRows, RedisRows, SqliteRows, rows_reader
from llmfeat.spark_jobs.materialize import materialize, publish, views_on

pytestmark = pytest.mark.integration

USERS, ITEMS = ["196", "22"], ["242", "302", "377"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "features.md"


def build_store(settings: Settings) -> None:
    tables = RustDelta(settings.delta_root)
    ts = datetime.now(UTC) - timedelta(days=1)
    tables.write("user_marc_v1_features", feature_table("user_id", USERS, vectors_for(USERS, 1), ts))
    tables.write("item_marc_v1_features", feature_table("item_id", ITEMS, vectors_for(ITEMS, 2), ts))
    published = publish(None, tables)
    materialize(apply_repo(settings), views_on([p.table for p in published if p.version >= 0]))


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = tiny_settings(tmp_path_factory.mktemp("lake"))
    build_store(settings)
    return settings


def check_batch(batch) -> None:  # type: ignore[no-untyped-def]
    assert batch.items.shape == (4, DIM) and batch.items.dtype == np.float32
    assert batch.item_missing.tolist() == [False, False, True, False] and not batch.user_missing
    np.testing.assert_allclose(batch.user, vectors_for(USERS, 1)[0], atol=1e-6)
    np.testing.assert_allclose(batch.items[[0, 1, 3]], vectors_for(ITEMS, 2), atol=1e-6)
    assert not batch.items[2].any()


def test_ranking_request_on_redis(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server, or make system-deps)")
    with redis_server() as conn:
        settings = tiny_settings(tmp_path, "feast.online_store=redis", f"feast.redis={conn}")
        build_store(settings)
        features = OnlineFeatures(open_store(settings), online_store="redis")
        check_batch(features.fetch("196", ["242", "302", "unknown", "377"]))
        same_rows_as_feast(settings, RedisRows)
        with pytest.raises(FeatureStoreError, match=r"feast.online_store is 'sqlite'.*RedisOnlineStore"):
            rows_reader(open_store(settings), "sqlite")


def test_sqlite_reader_reads_the_rows_feast_reads(sqlite_store: Settings) -> None:
    same_rows_as_feast(sqlite_store, SqliteRows)


def test_reader_refuses_a_store_the_setting_does_not_name(sqlite_store: Settings) -> None:
    """The reader follows feast.online_store; a store Feast built otherwise fails, naming the setting."""
    store = open_store(sqlite_store)
    with pytest.raises(FeatureStoreError, match=r"feast.online_store is 'redis'.*SqliteOnlineStore"):
        rows_reader(store, "redis")
    with pytest.raises(FeatureStoreError, match="feast.online_store is 'dynamodb'; expected sqlite or redis"):
        rows_reader(store, "dynamodb")
    assert isinstance(OnlineFeatures(store)._rows, SqliteRows)  # without the setting: the store's own kind


def same_rows_as_feast(settings: Settings, kind) -> None:  # type: ignore[no-untyped-def]
    """The direct reader returns byte for byte what Feast's own online_read gives, unknown ids as None."""
    store = open_store(settings)
    reader = rows_reader(store, settings.feast.online_store)
    assert isinstance(reader, kind)
    requests = [
        (store.get_feature_view("user_marc_v1_fv"), "user_vector", "user_id", ["22", "nobody", "196"]),
        (store.get_feature_view("item_marc_v1_fv"), "item_vector", "item_id", [*ITEMS, "unknown"]),
    ]
    got, feast = reader.read(requests), FeastRows(store).read(requests)
    assert got == feast and got[0][1] is None and got[1][-1] is None


def test_http_fetch_from_feast_serve_and_docs_snippet(sqlite_store: Settings) -> None:
    with feast_serve(sqlite_store) as url:
        check_batch(HttpFeatures(url).fetch("196", ["242", "302", "unknown", "377"]))
        snippet = re.search(r"<!-- snippet: http-client.*?```python\n(.*?)```", DOCS.read_text(), re.S)
        assert snippet, "docs/features.md lost its HTTP client snippet"
        code = snippet.group(1).replace("http://127.0.0.1:6566", url)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "['PRESENT', 'PRESENT', 'PRESENT']"
