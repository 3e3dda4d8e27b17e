"""A new MARC compressor version is published next to the old one: both views exist with their own vectors,
and a model pinned to the old version (its feature service) keeps being served the old vectors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_feast_materialize import ITEMS, PAST, USERS, tiny_lake
from test_feast_repo import feature_table, tiny_settings, vectors_for

from llmfeat import feast_repo
from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.feast_join import historical_features, vector_matrix
from llmfeat.registry import RegisteredCompressor
from llmfeat.serving.features import OnlineFeatures
from llmfeat.spark_jobs import compress, materialize
from llmfeat.validation import GateFailed

# What publishing compressor version 2 adds to the repository: its views, and a service naming them.
VERSION_2_VIEWS = """
user_marc_v2_fv, user_marc_v2_lineage_fv = user_marc_views(2)
item_marc_v2_fv, item_marc_v2_lineage_fv = item_marc_views(2)
"""
VERSION_2_SERVICE = """
from feature_views import item_marc_v2_fv, user_marc_v2_fv  # noqa: E402

ctr_marc_v3 = ctr_marc("ctr_marc_v3", user_marc_v2_fv, item_marc_v2_fv)
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository (`llmfeat features init`) that declares compressor version 2 next to version 1."""
    repo = feast_repo.init_repo(tmp_path / "repo")
    with (repo / "feature_views.py").open("a") as f:
        f.write(VERSION_2_VIEWS)
    with (repo / "feature_services.py").open("a") as f:
        f.write(VERSION_2_SERVICE)
    monkeypatch.setenv("LLMFEAT_FEATURE_REPO", str(repo))
    return repo


def compressor(entity: str, version: str) -> RegisteredCompressor:
    return RegisteredCompressor(f"llmfeat-marc-{entity}", version, "champion", {})


@pytest.mark.unit
def test_compress_publishes_only_a_declared_version_into_its_own_table() -> None:
    assert compress.feature_table("items", compressor("items", "1")) == "item_marc_v1_features"
    assert compress.feature_table("user_snapshots", compressor("users", "1")) == "user_marc_v1_features"
    compress.check_declared("items", compressor("items", "1"))
    with pytest.raises(compress.CompressError, match=r"add `item_marc_v2_fv, item_marc_v2_lineage_fv = "):
        compress.check_declared("items", compressor("items", "2"))  # the shipped repository: version 1 only


def fetch(settings: Settings, service: str) -> tuple[np.ndarray, np.ndarray]:
    """The vectors a model recording `service` (its feast.feature_service tag) gets for user 1 and ITEMS."""
    batch = OnlineFeatures(feast_repo.open_store(settings), service).fetch("1", ITEMS)
    return batch.user, batch.items


@pytest.mark.integration
def test_a_new_compressor_version_is_served_next_to_the_old_one(repo: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "lake")
    tables = RustDelta(settings.delta_root)
    tiny_lake(tables)  # compressor version 1: user_marc_v1_features, item_marc_v1_features
    materialize.run(None, settings)  # the vector tables only (no session: no counters)
    v1_users, v1_items = fetch(settings, "ctr_marc_v2")
    np.testing.assert_allclose(v1_users, vectors_for(USERS, 1)[0])

    # Version 2 compresses the whole history again, into its own tables.
    compress.check_declared("items", compressor("items", "2"))
    new_users, new_items = vectors_for(USERS, 11), vectors_for(ITEMS, 12)
    tables.write(
        "user_marc_v2_features", feature_table("user_id", USERS, new_users, PAST, compressor_version="2")
    )
    tables.write(
        "item_marc_v2_features", feature_table("item_id", ITEMS, new_items, PAST, compressor_version="2")
    )
    published = {p.table: p for p in materialize.run(None, settings)}
    assert {"feast_user_marc_v1", "feast_item_marc_v1", "feast_user_marc_v2", "feast_item_marc_v2"} <= set(
        t for t, p in published.items() if p.version >= 0
    )
    store = feast_repo.open_store(settings)
    views = {v.name for v in store.list_feature_views()}
    assert {"user_marc_v1_fv", "item_marc_v1_fv", "user_marc_v2_fv", "item_marc_v2_fv"} <= views
    for version in ("1", "2"):
        lineage = tables.read_arrow(f"feast_user_marc_v{version}")["compressor_version"].to_pylist()
        assert set(lineage) == {version}

    # The model pinned to version 1 gets the same vectors as before; a model on version 2 gets the new ones.
    users, items = fetch(settings, "ctr_marc_v2")
    np.testing.assert_array_equal(users, v1_users)
    np.testing.assert_array_equal(items, v1_items)
    users, items = fetch(settings, "ctr_marc_v3")
    np.testing.assert_allclose(users, new_users[0])
    np.testing.assert_allclose(items, new_items)
    assert not np.allclose(v1_users, users)
    # and so does its training set (the point-in-time join of the old service's vectors)
    refs = [f"{m.name}:{m.side}_vector" for m in feast_repo.service_marc_views("ctr_marc_v2")]
    assert refs == ["user_marc_v1_fv:user_vector", "item_marc_v1_fv:item_vector"]
    row = pd.DataFrame({"user_id": ["1"], "item_id": ["10"], "event_timestamp": [datetime.now(UTC)]})
    old, _ = vector_matrix(historical_features(store, row, refs), "user_vector", len(v1_users))
    np.testing.assert_array_equal(old[0], v1_users)

    # A version-1 table that would hold a version-2 vector is stopped by its gate before anything is written.
    before = tables.version("feast_user_marc_v1")
    stray = feature_table("user_id", ["9"], vectors_for(["9"], 5), PAST, compressor_version="2")
    tables.upsert("user_marc_v1_features", stray, ["user_id"])
    with pytest.raises(GateFailed, match="compressor_version"):
        materialize.run(None, settings)
    assert tables.version("feast_user_marc_v1") == before
