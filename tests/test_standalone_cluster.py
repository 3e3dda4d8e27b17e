"""The pipeline once on a standalone Spark master with two workers on 127.0.0.1 and `delta.backend:
delta-spark`: one driver runs ingest, encode, compress and materialize on the cluster's executors.

Its own file, so that it runs beside tests/test_delta_spark_pipeline.py (same tiny lake and compressor).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from test_delta_spark_pipeline import REPO_ROOT, pipeline_overrides, train_tiny_compressor

from llmfeat.config import Settings, load_settings

pytestmark = [pytest.mark.spark, pytest.mark.integration]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    return train_tiny_compressor(spark, tmp_path_factory.mktemp("standalone"))


def test_pipeline_on_a_standalone_cluster_with_two_workers(  # type: ignore[no-untyped-def]
    trained: tuple[Path, str], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from test_gpu_cluster import cluster_env

    settings = make_settings()
    master = start_cluster(tmp_path / "cluster", cluster_env())
    try:
        overrides = [*pipeline_overrides(*trained), f"spark.master={master.url}", "spark.driver_memory=1g",
                     "spark.extra.spark.executor.memory=1g", "spark.extra.spark.executor.cores=1",
                     f"data_dir={settings.data_dir}", *ingest_files(settings)]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", PIPELINE, *overrides],
            cwd=REPO_ROOT,
            env=cluster_env(),
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        master.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert "executors: 2" in done.stdout, done.stdout  # one on each worker
    assert "items_repr: encoded 4 texts" in done.stdout and "published feast_item_meta" in done.stdout
    assert "published feast_item_marc" in done.stdout
    tables = load_settings("tiny", [f"data_dir={settings.data_dir}"]).delta_root
    assert (tables / "feast_item_meta" / "_delta_log").is_dir()


# One driver on the cluster runs the four jobs in one session (what `llmfeat ingest`, `encode --entity items`,
# `compress --entity items` and `features materialize` run), then counts the executors that did the work.
PIPELINE = textwrap.dedent(
    """
    import sys
    from llmfeat.runner import run_with_session
    from llmfeat.spark_jobs import compress, encode, ingest, materialize

    def body(spark, settings):
        ingest.run(spark, settings)
        print(encode.run(spark, settings, "items"), flush=True)
        compress.run(spark, settings, ["items"])
        for p in materialize.run(spark, settings):
            print(f"published {p.table} version {p.version}", flush=True)
        infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()
        print("executors:", len(infos) - 1, flush=True)  # without the driver

    overrides = sys.argv[1:]
    sys.exit(run_with_session("pipeline", "tiny", overrides, body))
    """
)


def ingest_files(settings: Settings) -> list[str]:
    files = settings.ingest.files
    assert files is not None
    return ["ingest.source=files", f"ingest.files.interactions={files.interactions}",
            f"ingest.files.items={files.items}", f"ingest.files.users={files.users}"]  # fmt: skip


class Cluster:
    def __init__(self, url: str, procs: list[subprocess.Popen[bytes]]):
        self.url, self.procs = url, procs

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def start_cluster(work: Path, env: dict[str, str]) -> Cluster:
    """A master and two workers (1 core, 1 GB each) on 127.0.0.1, from pyspark's bin/spark-class."""
    from test_gpu_cluster import SPARK_CLASS, free_port, wait_for_workers

    work.mkdir(parents=True)
    port, ui = free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    cmds = [[str(SPARK_CLASS), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui)]]  # fmt: skip
    for i in range(2):
        cmds.append([str(SPARK_CLASS), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                     "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                     "--work-dir", str(work / f"worker{i}")])  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(cmds):
            log = (work / f"daemon{i}.log").open("w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_for_workers(ui, 2, work, timeout=90)
    except BaseException:
        Cluster(url, procs).stop()
        raise
    return Cluster(url, procs)
