"""The one place a SparkSession is built: local[*] by default, any master from config.

Jobs receive the session as a parameter; only `main()` functions and test fixtures call `build_session`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from llmfeat.config import SparkConf
from llmfeat.errors import UserError
from llmfeat.paths import conf_dir

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MIN_JAVA = 17


class JavaNotFound(UserError, RuntimeError):
    pass


def java_major_version() -> int | None:
    """The major version of the `java` Spark will start, or None when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def require_java() -> None:
    """Fail before the JVM starts, with one line a person can act on."""
    major = java_major_version()
    if major is None or major < MIN_JAVA:
        found = "no java found" if major is None else f"found Java {major}"
        raise JavaNotFound(
            f"Spark 4 needs Java 17 or 21 ({found}): install one "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME to it"
        )


def session_conf(cfg: SparkConf) -> dict[str, str]:
    """Every spark.* setting the session gets, from config: loopback, UTC, microsecond timestamps, GPUs."""
    conf = {
        "spark.driver.memory": cfg.driver_memory,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        # Feast and delta-rs read INT96 badly; microsecond timestamps round-trip exactly.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
    }
    if cfg.master.startswith("local"):
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    gpu = cfg.gpu
    if gpu.executor_amount > 0:
        conf["spark.executor.resource.gpu.amount"] = str(gpu.executor_amount)
        conf["spark.task.resource.gpu.amount"] = str(gpu.task_amount or 1)
        if gpu.discovery_script:
            script = gpu.discovery_script
            conf["spark.executor.resource.gpu.discoveryScript"] = (
                script if os.path.isabs(script) else str(conf_dir() / script)
            )
    conf.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.extra.items()})
    return conf


def build_session(cfg: SparkConf) -> SparkSession:
    require_java()
    # Workers must run this interpreter (it has pyarrow, torch and this project); bind to loopback locally.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name)
    for key, value in session_conf(cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
