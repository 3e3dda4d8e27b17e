"""GPU scheduling on a real Spark standalone cluster (master and worker on 127.0.0.1, from pyspark's bin/).

The worker's discovery script (conf/gpu_discovery.sh with LLMFEAT_FAKE_GPUS=2) reports two GPU addresses; the
encode job asks for 2 GPUs per executor and 1 per task, so two concurrent tasks each get their own address.
On a machine without CUDA the encoder falls back to the CPU and says so, per task.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pyspark
import pytest
from conftest import SHORT_LIVED_JVM
from test_encoder import make_tiny_model_dir

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
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


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master and one worker (2 cores, 2 GPU addresses); yields the master URL; both stopped after."""
    work = tmp_path_factory.mktemp("standalone")
    port, ui = free_port(), free_port()
    props = work / "worker.properties"
    props.write_text(
        "spark.worker.resource.gpu.amount 2\n"
        f"spark.worker.resource.gpu.discoveryScript {REPO_ROOT / 'conf' / 'gpu_discovery.sh'}\n"
    )
    master_cmd = [str(SPARK_CLASS), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1"]
    master_cmd += ["--port", str(port), "--webui-port", str(ui)]
    url = f"spark://127.0.0.1:{port}"
    worker_cmd = [str(SPARK_CLASS), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1"]
    worker_cmd += ["--cores", "2", "--memory", "2g", "--webui-port", str(free_port())]
    worker_cmd += ["--work-dir", str(work / "work"), "--properties-file", str(props)]
    procs = []
    try:
        for name, cmd in (("master", master_cmd), ("worker", worker_cmd)):
            log = (work / f"{name}.log").open("w")
            procs.append(subprocess.Popen(cmd, env=cluster_env(), stdout=log, stderr=subprocess.STDOUT))
        wait_for_workers(ui, 1, work)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


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


def run_driver_on_cluster(work: Path, script: str, args: Callable[[str], list[str]], cwd: Path) -> str:
    """`python -c script *args(master URL)` as the driver of a fresh two-worker cluster (stopped after); its
    stdout, once it exited 0."""
    master = start_cluster(work, cluster_env())
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args(master.url)],
            cwd=cwd,
            env=cluster_env(),
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        master.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def test_each_task_gets_its_own_gpu_address(
    standalone: str,
    spark,
    ingested: Path,
    make_settings: Callable[..., Settings],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = make_settings()  # over the tiny tables, ingested with the test session
    model = make_tiny_model_dir(tmp_path / "tiny-llama")
    overrides = [
        f"spark.master={standalone}",
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
