"""The jobs on a real Spark standalone cluster: a master and two workers on 127.0.0.1, from pyspark's bin/,
started once for this file's drivers (one application at a time, each asking for 2 cores: `spark.cores.max`).

- GPU scheduling: each worker's discovery script (conf/gpu_discovery.sh with LLMFEAT_FAKE_GPUS=2) reports two
  GPU addresses; the encode job asks for 2 GPUs per executor and 1 per task, so two concurrent tasks each get
  their own address. On a machine without CUDA the encoder falls back to the CPU and says so, per task.
- The pipeline with `delta.backend: delta-spark`, one executor on each worker (test_delta_spark_pipeline.py).
- CTR training on two workers through TorchDistributor (test_ctr_stream.py holds the driver script).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyspark
import pytest
from conftest import SHORT_LIVED_JVM, source_overrides
from test_compress import LAYERS, repr_table
from test_ctr_stream import ON_CLUSTER, WORKER_CFG, files  # noqa: F401  (files: its module fixture)
from test_encoder import make_tiny_model_dir

from llmfeat.config import Settings, load_settings
from llmfeat.delta_io import RustDelta, SparkDelta, has_delta_jars
from llmfeat.session import java_major_version

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif((java_major_version() or 0) < 17, reason="Spark 4 needs Java 17+"),
]
SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env() -> dict[str, str]:
    return {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "LLMFEAT_FAKE_GPUS": "2",
        "PYSPARK_PYTHON": sys.executable,
    }


def wait_for_workers(ui: int, n: int, work: Path, timeout: float = 120) -> None:
    """Until the master at web UI port `ui` lists `n` ALIVE workers; else fail with the daemons' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2))
            if sum(w["state"] == "ALIVE" for w in state.get("workers", [])) >= n:
                return
        except OSError:
            pass
        time.sleep(1)
    logs = "\n".join(p.read_text()[-2000:] for p in work.glob("*.log"))
    raise AssertionError(f"{n} standalone worker(s) did not register within {timeout} s:\n{logs}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master and two workers (2 cores, 2 GB and 2 GPU addresses each); yields the master URL; all three
    stopped after the file's tests."""
    work = tmp_path_factory.mktemp("cluster")
    port, ui = free_port(), free_port()
    props = work / "worker.properties"
    props.write_text(
        "spark.worker.resource.gpu.amount 2\n"
        f"spark.worker.resource.gpu.discoveryScript {REPO_ROOT / 'conf' / 'gpu_discovery.sh'}\n"
    )
    url = f"spark://127.0.0.1:{port}"
    cmds = [[str(SPARK_CLASS), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui)]]  # fmt: skip
    for i in range(2):
        cmds.append([str(SPARK_CLASS), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                     "--cores", "2", "--memory", "2g", "--webui-port", str(free_port()),
                     "--work-dir", str(work / f"worker{i}"), "--properties-file", str(props)])  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(cmds):
            log = (work / f"daemon{i}.log").open("w")
            procs.append(subprocess.Popen(cmd, env=cluster_env(), stdout=log, stderr=subprocess.STDOUT))
        wait_for_workers(ui, 2, work)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


# Each application takes 2 of the 4 cores: executors of 1 core are spread one on each worker, an executor
# of 2 cores sits on one.
TWO_CORES = "spark.extra.spark.cores.max=2"


def run_driver(script: str, args: list[str], cwd: Path) -> str:
    """`python -c script *args` as a driver of the cluster (its URL among `args`); its stdout, once it
    exited 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def test_each_task_gets_its_own_gpu_address(
    cluster: str,
    spark,
    ingested: Path,
    make_settings: Callable[..., Settings],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = make_settings()  # over the tiny tables, ingested with the test session
    model = make_tiny_model_dir(tmp_path / "tiny-llama")
    overrides = [
        f"spark.master={cluster}",
        TWO_CORES,
        f"data_dir={settings.data_dir}",
        "spark.driver_memory=1g",
        "spark.gpu.executor_amount=2",
        "spark.gpu.task_amount=1",
        "spark.gpu.discovery_script=conf/gpu_discovery.sh",
        "spark.extra.spark.executor.cores=2",
        "spark.extra.spark.executor.memory=1g",
        f"spark.extra.spark.executor.extraJavaOptions={SHORT_LIVED_JVM}",
        "spark.extra.spark.executorEnv.LLMFEAT_FAKE_GPUS=2",
        f"encode.model={model}",
        "encode.layers=[1,2]",
        "encode.partitions=2",
    ]
    cmd = [sys.executable, "-m", "llmfeat.spark_jobs.encode", "--config", "tiny", "--entity", "items"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**cluster_env(), "SPARK_LOCAL_IP": "127.0.0.1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    tasks = re.findall(r"task (\d+): gpu (\S+) -> (\S+) \((.*)\)", done.stdout)
    assert len(tasks) == 2, done.stdout
    assert sorted(addr for _, addr, _, _ in tasks) == ["0", "1"]  # each task its own address
    for _, addr, device, why in tasks:
        assert f"Spark assigned GPU address {addr}" in why
        assert device == "cpu" and "falling back to CPU" in why  # no CUDA here; said per task
    assert "items_repr: encoded 4 texts" in done.stdout
    assert RustDelta(settings.delta_root).read_arrow("items_repr").num_rows == 4 * 2


# The pipeline through Spark's Delta: the tiny lake from the tiny CSVs (conftest) and a tiny random-weight
# Llama; the MARC compressors are registered untrained with the lineage of that encoder, width and layer
# (its MLflow store is the lake's).
WIDTH, ENCODER = 32, "tiny-llama"  # the tiny Llama's hidden size and encoder id (its folder's name)


def pipeline_overrides(model: Path, store: str) -> list[str]:
    return [
        "delta.backend=delta-spark",
        f"encode.model={model}",
        f"encode.layers=[{','.join(map(str, LAYERS))}]",
        "encode.max_length=64",
        "encode.partitions=2",
        f"marc.layer={LAYERS[-1]}",
        "marc.out_dim=64",  # the width feature_repo declares for MARC vectors
        "marc.hidden_dim=8",
        "marc.task_dim=4",
        "marc.max_epochs=2",
        "marc.batch_size=64",
        "marc.registry_name=test-marc",
        f"mlflow.tracking_uri={store}",
    ]


def register_tiny_compressor(root: Path) -> tuple[Path, str]:
    """(tiny model folder, MLflow store holding untrained champion compressors for it), made under `root`:
    the lineage of the tiny Llama's representation tables (encoder, width, layer). This test checks where the
    tables are written; test_mlflow_project trains compressors."""
    import mlflow

    from llmfeat.models.marc.model import MarcCompressor
    from llmfeat.registry import log_and_register, use_tracking
    from llmfeat.reprs import layer_lineage

    model = make_tiny_model_dir(root / ENCODER)
    store = f"sqlite:///{root / 'mlflow.db'}"
    settings = load_settings("tiny", [f"data_dir={root}", *pipeline_overrides(model, store)])
    marc = settings.marc
    use_tracking(settings, marc.experiment)
    with mlflow.start_run():
        for entity, key in (("users", "snapshot_id"), ("items", "item_id")):
            table = repr_table(key, 2, ENCODER, WIDTH)
            lineage = layer_lineage(table, "tiny", marc.layer) | {
                "entity": entity,
                "in_dim": WIDTH,
                "out_dim": marc.out_dim,
            }
            compressor = MarcCompressor(in_dim=WIDTH, out_dim=marc.out_dim, hidden_dim=marc.hidden_dim)
            log_and_register(compressor, settings, entity, lineage)
    return model, store


@pytest.mark.spark
def test_pipeline_on_a_standalone_cluster_writes_through_spark_delta_and_feast_reads_it(  # type: ignore[no-untyped-def]
    cluster: str, spark, make_settings: Callable[..., Settings], source_dir: Path, tmp_path: Path
) -> None:
    assert has_delta_jars(spark), "the test session has no delta-spark jars: run `make setup`"
    trained = register_tiny_compressor(tmp_path / "compressor")
    settings = make_settings(*pipeline_overrides(*trained))
    overrides = [*pipeline_overrides(*trained), "spark.driver_memory=1g",
                 "spark.extra.spark.executor.memory=1g", "spark.extra.spark.executor.cores=1",
                 f"spark.extra.spark.executor.extraJavaOptions={SHORT_LIVED_JVM}",
                 f"data_dir={settings.data_dir}", *source_overrides(source_dir)]  # fmt: skip
    out = run_driver(PIPELINE, [*overrides, f"spark.master={cluster}", TWO_CORES], REPO_ROOT)
    assert "executors: 2" in out, out  # one on each worker
    assert "items_repr: encoded 4 texts" in out, out
    assert "user_snapshots_repr: encoded" in out, out
    assert "items_repr: nothing to encode (4 texts unchanged)" in out, out  # a re-run
    published = [line.split()[1] for line in out.splitlines() if line.startswith("published ")]
    check_written_by_spark(spark, settings, published)
    check_point_in_time_set(spark, settings)


# One driver on the cluster runs the jobs in one session (what `llmfeat ingest`, `encode`, `compress` and
# `features materialize` run), re-runs the item encoding, then counts the executors that did the work.
PIPELINE = textwrap.dedent(
    """
    import sys
    from llmfeat.runner import run_with_session
    from llmfeat.spark_jobs import compress, encode, ingest, materialize

    def body(spark, settings):
        ingest.run(spark, settings)
        for entity in ("items", "user_snapshots", "items"):
            print(encode.run(spark, settings, entity), flush=True)
        compress.run(spark, settings)
        for p in materialize.run(spark, settings):
            if p.version >= 0:
                print(f"published {p.table} version {p.version}", flush=True)
        infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()
        print("executors:", len(infos) - 1, flush=True)  # without the driver

    overrides = sys.argv[1:]
    sys.exit(run_with_session("pipeline", "tiny", overrides, body))
    """
)


def check_written_by_spark(spark, settings: Settings, feast_tables: list[str]) -> None:  # type: ignore[no-untyped-def]
    tables = SparkDelta(settings.delta_root, spark)
    for name in ("items", "interactions", "items_repr", "user_snapshots_repr", *feast_tables):
        engine = tables.history(name)[-1]["engineInfo"] or ""
        assert "Delta-Lake" in engine, (name, engine)  # committed by delta-spark, not delta-rs
    assert tables.read_spark("items_repr").count() == 4 * len(LAYERS)
    assert {"feast_item_meta", "feast_user_stats"} <= set(feast_tables)
    assert any(t.startswith("feast_item_marc") for t in feast_tables), feast_tables


def check_point_in_time_set(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Feast's Spark offline store (SparkSource twins, tables registered in the session's catalog) joins each
    interaction to the values at or before its own time."""
    from llmfeat.feast_join import historical_features
    from llmfeat.feast_repo import apply_repo, feature_views

    spark_settings = settings.model_copy(
        update={"feast": settings.feast.model_copy(update={"offline_store": "spark"})}
    )
    names = [p.name for p in Path(settings.delta_root).iterdir() if p.name.startswith("feast_")]
    for name in names:
        spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{settings.delta_root / name}'")
    try:
        store = apply_repo(spark_settings)
        item_marc = sorted(v for v in feature_views() if v.startswith("item_marc_v") and "lineage" not in v)[
            0
        ]
        rows = SparkDelta(settings.delta_root, spark).read_spark("interactions").toPandas()
        rows = rows[["user_id", "item_id", "event_timestamp", "label"]].sort_values("event_timestamp")
        features = ["item_meta_fv:year", "item_stats_fv:item_impressions", f"{item_marc}:item_vector"]
        out = historical_features(store, rows, features)
    finally:
        for name in names:
            spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.conf.unset("spark.sql.parser.quotedRegexColumnNames")  # Feast sets it on the shared session
    assert len(out) == len(rows) == 10 and out["label"].tolist() == rows["label"].tolist()
    assert out["year"].dropna().astype(int).isin([1995]).all()
    first = out.groupby("item_id")["event_timestamp"].transform("min") == out["event_timestamp"]
    # item counters are stamped at the end of each day: none is visible at an item's first interaction
    assert pd.isna(out.loc[first, "item_impressions"]).all()
    assert out["item_vector"].notna().any()


@pytest.mark.spark
def test_train_ctr_workers_run_on_a_standalone_cluster_through_torch_distributor(
    cluster: str,
    files: list[str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    out = run_driver(ON_CLUSTER, [cluster, str(tmp_path / "data"), *files], Path(__file__).parent)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["executors"] == 2 and result["epochs"] == WORKER_CFG.max_epochs
    assert result["auc"] > 0.7
