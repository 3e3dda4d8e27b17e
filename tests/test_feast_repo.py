"""Feast repository declarations, generated config and the float16/int8 -> float32 publish step (no Spark)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llmfeat import feast_repo
from llmfeat.config import Settings, load_settings
from llmfeat.paths import feature_repo_dir
from llmfeat.reprs import MarcView
from llmfeat.serving.features import parse_response
from llmfeat.session import DELTA_SQL
from llmfeat.spark_jobs.materialize import FeatureTableError, VectorTable, decode_vectors

DIM = 64
USER_SPEC, ITEM_SPEC = (VectorTable.marc(MarcView(side, "1")) for side in ("user", "item"))
LINEAGE = {
    "source_version": 3,
    "encoder_id": "smollm2-135m",
    "layer": 15,
    "compressor_name": "marc",
    "compressor_version": "1",
}


def vectors_for(keys: list[str], seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Deterministic float32 vectors [len(keys), dim]; exactly representable in float16."""
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(size=(len(keys), dim)) * 8) / 8


def feature_table(
    key: str,
    keys: list[str],
    vectors: np.ndarray,
    ts: datetime | list[datetime],
    dtype: str = "float16",
    compressor_version: str = "1",
) -> pa.Table:
    """A compress-job output table: key, vector (float16, or int8 + scale), event_timestamp, lineage."""
    stamps = ts if isinstance(ts, list) else [ts] * len(keys)
    cols: dict[str, pa.Array] = {key: pa.array(keys, pa.string())}
    if dtype == "int8":
        scale = np.abs(vectors).max(axis=1) / 127
        q = np.round(vectors / scale[:, None]).astype(np.int8)
        cols["vector"] = pa.array(list(q), pa.list_(pa.int8()))
        cols["scale"] = pa.array(scale.astype(np.float32), pa.float32())
    else:
        # Delta has no half type: the compress job stores float16-exact values as float32.
        cols["vector"] = pa.array(list(vectors.astype(np.float16).astype(np.float32)), pa.list_(pa.float32()))
        cols["scale"] = pa.nulls(len(keys), pa.float32())
    cols["event_timestamp"] = pa.array(stamps, pa.timestamp("us", tz="UTC"))
    for name, value in {**LINEAGE, "compressor_version": compressor_version, "dtype": dtype}.items():
        cols[name] = pa.array([value] * len(keys))
    return pa.table(cols)


def tiny_settings(data_dir: Path, *overrides: str) -> Settings:
    return load_settings("tiny", [f"data_dir={data_dir}", *overrides])


@pytest.mark.unit
def test_declarations_import_without_side_effects(tmp_path: Path) -> None:
    code = "import sys; sys.path.insert(0, 'feature_repo'); import feature_services, feature_views"
    subprocess.run([sys.executable, "-c", code], cwd=feature_repo_dir().parent, check=True)
    found = feast_repo.declarations()
    views = feast_repo.feature_views()
    assert {"user_marc_v1_fv", "item_marc_v1_fv", "behavior_llm_fv", "item_meta_fv", "user_stats_fv"} <= set(
        views
    )
    assert {"ctr_marc_v2", "ctr_id_v2", "user", "item", "behavior"} <= set(found)
    assert feast_repo.vector_dim(views["item_marc_v1_fv"]) == DIM
    assert not list(feature_repo_dir().glob("*.db"))  # importing wrote nothing


def test_feast_imports_without_typeguards_recompiling_and_puts_the_decorator_back(tmp_path: Path) -> None:
    script = tmp_path / "check.py"  # typeguard instruments from source: a file, not `python -c`
    script.write_text("""
import typeguard
checked = typeguard.typechecked
from llmfeat import feast_repo
feast_repo.import_feast()
import feast
assert typeguard.typechecked is checked, "the decorator was not put back"

@typeguard.typechecked
def double(x: int) -> int:
    return 2 * x

try:
    double("a")
except typeguard.TypeCheckError:
    pass
else:
    raise SystemExit("code decorated after feast's import is not checked")
print(sorted(set(feast.FeatureView.__init__.__code__.co_names) & {"check_argument_types_internal"}))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"  # feast's methods as written, not recompiled with checks


@pytest.mark.unit
def test_store_config_per_profile(tmp_path: Path) -> None:
    local = feast_repo.store_config(tiny_settings(tmp_path))
    # feature_repo/feature_store.yaml with this profile's stores: under its data dir, never in feature_repo/
    assert local["online_store"] == {
        "type": "sqlite",
        "path": str(tmp_path.resolve() / "feast" / "online.db"),
    }
    assert local["registry"] == str(tmp_path.resolve() / "feast" / "registry.db")
    assert (
        local["offline_store"] == {"type": "llmfeat.feast_delta.DeltaFileOfflineStore"}
        and local["project"] == "llmfeat"
    )
    cluster = feast_repo.store_config(load_settings("cluster"))
    assert cluster["online_store"]["type"] == "redis"
    assert cluster["offline_store"]["type"] == "spark"
    assert cluster["batch_engine"]["type"] == "spark.engine"
    spark_objects = feast_repo.repo_objects(load_settings("cluster"))
    item_fv = next(o for o in spark_objects if getattr(o, "name", "") == "item_marc_v1_fv")
    assert item_fv.batch_source.name == "item_marc_v1_spark_source"
    with pytest.raises(feast_repo.FeatureStoreError, match="offline_store spark"):
        feast_repo.store_config(tiny_settings(tmp_path, "feast.batch_engine=spark"))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_decode_to_float32(dtype: str) -> None:
    keys = ["1", "2", "3"]
    vecs = vectors_for(keys)
    out = decode_vectors(
        feature_table("item_id", keys, vecs, datetime(2024, 1, 1, tzinfo=UTC), dtype), ITEM_SPEC, DIM
    )
    assert out.schema.field("item_vector").type == pa.list_(pa.float32())
    got = np.array(out["item_vector"].to_pylist(), dtype=np.float32)
    tol = 0 if dtype == "float16" else np.abs(vecs).max() / 127
    np.testing.assert_allclose(got, vecs, atol=tol)
    assert out["layer"].to_pylist() == [15] * 3 and out["dtype"].to_pylist() == [dtype] * 3


@pytest.mark.unit
def test_decode_rejects_wrong_dimension_and_nan() -> None:
    ts = datetime(2024, 1, 1, tzinfo=UTC)
    short = feature_table("user_id", ["7", "8"], vectors_for(["7", "8"], dim=32), ts)
    with pytest.raises(FeatureTableError, match=r"vector length \[32\].*declares 64.*\['7', '8'\]"):
        decode_vectors(short, USER_SPEC, DIM)
    vecs = vectors_for(["7", "8"])
    vecs[1, 3] = np.nan
    with pytest.raises(FeatureTableError, match=r"non-finite.*\['8'\]"):
        decode_vectors(feature_table("user_id", ["7", "8"], vecs, ts), USER_SPEC, DIM)


@pytest.mark.unit
def test_parse_http_response_flags_unknown_ids() -> None:
    body = {
        "metadata": {"feature_names": ["user_id", "item_id", "user_vector", "item_vector"]},
        "results": [
            {"values": ["1", "1"], "statuses": ["PRESENT"] * 2},
            {"values": ["a", "zz"], "statuses": ["PRESENT"] * 2},
            {"values": [[1.0] * 4, [1.0] * 4], "statuses": ["PRESENT"] * 2},
            {"values": [[2.0] * 4, None], "statuses": ["PRESENT", "NOT_FOUND"]},
        ],
    }
    batch = parse_response(body, n=2, dim=4)
    assert batch.items.shape == (2, 4) and batch.items.dtype == np.float32
    assert batch.item_missing.tolist() == [False, True] and not batch.user_missing
    assert batch.items[1].sum() == 0 and batch.user[0] == 1.0


@pytest.mark.integration
def test_publish_gates_every_feast_table_before_the_first_write(tmp_path: Path) -> None:
    from llmfeat.delta_io import RustDelta
    from llmfeat.spark_jobs.materialize import publish
    from llmfeat.validation import GateFailed

    tables = RustDelta(tmp_path / "delta")
    ts = datetime.now(UTC) - timedelta(days=1)
    users = ["1", "2", "3"]
    tables.write("user_marc_v1_features", feature_table("user_id", users, vectors_for(users), ts))
    two_encoders = feature_table("item_id", ["7", "8"], vectors_for(["7", "8"]), ts)
    encoders = pa.array(["smollm2-135m", "other-llm"])
    two_encoders = two_encoders.set_column(
        two_encoders.column_names.index("encoder_id"), "encoder_id", encoders
    )
    tables.write("item_marc_v1_features", two_encoders)
    with pytest.raises(GateFailed) as failed:
        publish(None, tables)
    report = failed.value.report
    assert report.table == "feast_item_marc_v1" and "encoder_id" in str(failed.value)
    assert not tables.exists("feast_user_marc_v1") and not tables.exists(
        "feast_item_marc_v1"
    )  # nothing written
    assert tables.read_arrow("quarantine").num_rows == 2  # a table-level failure: the whole batch
    one_encoder = feature_table("item_id", ["7", "8"], vectors_for(["7", "8"]), ts)
    tables.upsert("item_marc_v1_features", one_encoder, ["item_id"], delete_missing=True)
    published = {p.table: p for p in publish(None, tables)}
    assert published["feast_user_marc_v1"].rows == 3 and published["feast_item_marc_v1"].rows == 2


@pytest.mark.unit
def test_vector_decoding_reads_plain_float_lists_and_parses_the_rest() -> None:
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Value

    from llmfeat.serving.online_read import decode_vectors

    v = vectors_for(["a", "b"], dim=4).astype(np.float32)
    plain = [Value(float_list_val=FloatList(val=x)).SerializeToString() for x in v]
    other = Value(double_list_val=DoubleList(val=[1.0] * 4)).SerializeToString()
    out, missing = decode_vectors([plain[0], None, other, plain[1]], 4)
    assert out.dtype == np.float32 and missing.tolist() == [False, True, True, False]
    np.testing.assert_array_equal(out[[0, 3]], v)
    assert not out[[1, 2]].any()
    with pytest.raises(ValueError, match="dimension 4, expected 3"):
        decode_vectors([plain[0]], 3)


@pytest.mark.integration
def test_feast_cli_plans_in_feature_repo_with_no_variable_set(tmp_path: Path) -> None:
    """`cd feature_repo && feast plan` on the committed feature_store.yaml (a copy, so that the checkout's
    data dir is not touched), and `llmfeat features init` writes a repository a pip user can run."""
    target = feast_repo.init_repo(tmp_path / "repo")
    assert (target / "feature_store.yaml").is_file() and (target / "feature_views.py").is_file()
    (tmp_path / "data" / "local" / "feast").mkdir(parents=True)  # the jobs make it (the default data dir)
    env = {k: v for k, v in os.environ.items() if k != "LLMFEAT_DATA_DIR"}
    feast = str(Path(sys.executable).with_name("feast"))
    out = subprocess.run([feast, "plan"], cwd=target, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "user_marc_v1_fv" in out.stdout and not list(target.glob("*.db"))


@pytest.mark.unit
def test_cluster_file_takes_registry_and_redis_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both files through Feast's own loader: the default with no variable, the cluster one with its six."""
    from feast.repo_config import load_repo_config

    repo = feature_repo_dir()
    for name in ("LLMFEAT_REGISTRY", "LLMFEAT_REDIS", "LLMFEAT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    local = load_repo_config(repo, repo / "feature_store.yaml")
    assert local.registry.registry_type == "file" and local.registry.path == "../data/local/feast/registry.db"
    assert local.online_store.type == "sqlite" and local.online_store.path == "../data/local/feast/online.db"
    url = "postgresql+psycopg://feast:secret@db.internal:5432/feast"
    monkeypatch.setenv("LLMFEAT_REGISTRY", url)
    monkeypatch.setenv("LLMFEAT_REDIS", "redis.internal:6379")
    monkeypatch.setenv("LLMFEAT_SPARK_MASTER", "spark://spark-master.internal:7077")
    monkeypatch.setenv("LLMFEAT_DELTA_JARS", "/opt/jars/delta-spark_4.1_2.13-4.4.0.jar")
    text = (repo / "feature_store.cluster.yaml").read_text()
    named = set(re.findall(r"\$\{(\w+)\}", text))
    exported = set(re.findall(r"^#   export (\w+)=", text, re.MULTILINE))
    assert named <= exported and len(exported) == 6  # the header lists every variable the file reads
    cluster = load_repo_config(repo, repo / "feature_store.cluster.yaml")
    assert cluster.registry.registry_type == "sql" and cluster.registry.path == url
    assert cluster.online_store.type == "redis"
    assert cluster.online_store.connection_string == "redis.internal:6379"
    assert cluster.offline_store.type == "spark"
    # Materialized by Feast's Spark engine, in a session with the offline store's Delta jars and catalog
    assert cluster.batch_engine.type == "spark.engine"
    assert cluster.batch_engine.spark_conf == cluster.offline_store.spark_conf
    conf = cluster.offline_store.spark_conf
    assert conf["spark.master"] == "spark://spark-master.internal:7077"
    assert conf["spark.jars"] == "/opt/jars/delta-spark_4.1_2.13-4.4.0.jar"
    assert DELTA_SQL.items() <= conf.items() and conf["spark.sql.session.timeZone"] == "UTC"
    assert cluster.materialization_config.pull_latest_features


@pytest.mark.unit
def test_why_one_file_cannot_serve_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reasons README gives for the second file, as Feast 0.67 has them."""
    from feast.errors import FeastRegistryTypeInvalidError
    from feast.infra.registry.registry import get_registry_store_class_from_scheme
    from feast.repo_config import RegistryConfig, get_registry_config_from_type, load_repo_config

    repo = feature_repo_dir()
    monkeypatch.delenv("LLMFEAT_REGISTRY", raising=False)
    monkeypatch.setenv("LLMFEAT_REDIS", "redis.internal:6379")
    unset = load_repo_config(repo, repo / "feature_store.cluster.yaml")
    assert unset.registry.path == "${LLMFEAT_REGISTRY}"  # an unset variable stays as literal text
    with pytest.raises(FeastRegistryTypeInvalidError):  # the registry type cannot be a variable either
        get_registry_config_from_type("${LLMFEAT_REGISTRY_TYPE}")
    url = "postgresql+psycopg://feast:secret@db.internal:5432/feast"
    assert RegistryConfig(path=url).registry_type == "file"  # a database URL alone: the file registry,
    with pytest.raises(Exception, match="unsupported scheme"):  # which cannot store in a database
        get_registry_store_class_from_scheme(url)


def test_lineage_views_serve_the_contracts_lineage_columns() -> None:
    """feature_repo/ imports nothing of llmfeat (feast runs there alone), so its lineage fields are written
    out; they must be exactly the feature tables' lineage of llmfeat/reprs.py, with the same types."""
    from llmfeat.reprs import FEATURE_LINEAGE

    kinds = {pa.int64(): "Int64", pa.string(): "String"}
    lineage_views = [v for name, v in feast_repo.feature_views().items() if name.endswith("_lineage_fv")]
    assert lineage_views
    for view in lineage_views:
        fields = {f.name: str(f.dtype) for f in view.schema if not f.name.endswith(("valid_from", "until"))}
        assert fields == {c: kinds[t] for c, t in FEATURE_LINEAGE.items()}, view.name
