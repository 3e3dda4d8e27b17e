"""The one place a SparkSession is built: local[*] by default, any master from config.

Jobs receive the session as a parameter; only `main()` functions and test fixtures call `build_session`.

Started by spark-submit, a job runs where spark-submit says: its --master, --deploy-mode, memory, --packages
and spark-defaults.conf win, and the config only fills settings they leave unset (never the master, the
driver's memory or its bind address; always JOB_OWNS); PYSPARK_PYTHON is left to the cluster. Started by
`llmfeat`, the session takes everything from the config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from llmfeat.config import DeltaConf, GpuConf, SparkConf
from llmfeat.delta_jars import local_jars
from llmfeat.errors import UserError
from llmfeat.jvm_archive import java_options
from llmfeat.paths import conf_dir

if TYPE_CHECKING:
    from pyspark.resource import ResourceProfile
    from pyspark.sql import SparkSession

MIN_JAVA = 17
# Where the driver and its executors run: spark-submit's to decide whenever it started the job.
SUBMIT_OWNS = ("spark.master", "spark.submit.deployMode", "spark.driver.memory", "spark.driver.host",
               "spark.driver.bindAddress")  # fmt: skip
# What the jobs' output is correct only with (Feast reads UTC microsecond timestamps): set in any case.
JOB_OWNS = ("spark.sql.session.timeZone", "spark.sql.parquet.outputTimestampType",
            "spark.sql.execution.arrow.pyspark.enabled")  # fmt: skip
# delta-spark's SQL extension and catalog (MERGE, OPTIMIZE, VACUUM, time travel in SQL).
DELTA_SQL = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


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


def session_conf(
    cfg: SparkConf, submitted: Mapping[str, str] | None = None, delta: DeltaConf | None = None
) -> dict[str, str]:
    """Every spark.* setting the session gets from config: master, loopback, UTC, microsecond timestamps,
    GPUs, with `delta` the delta-spark jars and SQL settings its backend needs, and the set-up's JVM class
    archive for a driver the session starts (llmfeat/jvm_archive.py). `submitted`:
    spark-submit's conf, when it started the job; then only what it leaves unset, and nothing in SUBMIT_OWNS
    (JOB_OWNS always)."""
    conf = {
        "spark.master": cfg.master,
        "spark.app.name": cfg.app_name,
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
    if gpu.executor_amount > 0:  # executors hold GPUs; only the encode stage asks for them (gpu_profile)
        conf["spark.executor.resource.gpu.amount"] = str(gpu.executor_amount)
        if gpu.discovery_script:
            conf["spark.executor.resource.gpu.discoveryScript"] = discovery_script(gpu)
    conf.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.extra.items()})
    if delta is not None:
        conf.update(delta_conf(delta, {**conf, **(submitted or {})}))
    archive = java_options()  # the set-up's class archive, for the driver JVM the session starts
    if archive and submitted is None:
        given = conf.get("spark.driver.extraJavaOptions", "")
        conf["spark.driver.extraJavaOptions"] = f"{given} {archive}".strip()
    if submitted is not None:
        conf = {k: v for k, v in conf.items() if k in JOB_OWNS or k not in (*SUBMIT_OWNS, *submitted)}
    return conf


def delta_conf(delta: DeltaConf, given: Mapping[str, str]) -> dict[str, str]:
    """What delta-spark needs, for delta.backend delta-spark: the jars the set-up resolved in spark.jars
    (after any the profile lists), the Delta SQL extension and catalog. Jars named already in spark.jars or
    spark.jars.packages (the profile's, or spark-submit's --jars / --packages) are left as they are. Without
    jars nothing is added: SparkDelta then stops with what to do."""
    if delta.backend != "delta-spark":
        return {}
    named = any("delta-spark" in given.get(k, "") for k in ("spark.jars", "spark.jars.packages"))
    jars = [] if named else local_jars(delta.jars)
    if not named and not jars:
        return {}
    conf = {k: given.get(k, v) for k, v in DELTA_SQL.items()}
    extensions = conf["spark.sql.extensions"].split(",")
    if DELTA_SQL["spark.sql.extensions"] not in extensions:  # the profile's own extensions, and Delta's
        conf["spark.sql.extensions"] = ",".join([*extensions, DELTA_SQL["spark.sql.extensions"]])
    if jars:
        conf["spark.jars"] = ",".join([j for j in given.get("spark.jars", "").split(",") if j] + jars)
    return conf


def discovery_script(gpu: GpuConf) -> str:
    """The GPU discovery script's path; a relative one is taken from the profile folder."""
    script = gpu.discovery_script or ""
    return script if not script or os.path.isabs(script) else str(conf_dir() / script)


def submitted_conf() -> dict[str, str] | None:
    """spark-submit's conf (its flags and spark-defaults.conf) when spark-submit started this driver, else
    None. spark-submit starts the JVM first and hands the Python driver its gateway; its conf always holds
    spark.master. Nothing is started here when there is no such gateway."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf as JvmConf
    from pyspark import SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM, so SparkConf reads its properties
    conf = JvmConf()
    return dict(conf.getAll()) if conf.contains("spark.master") else None


def build_session(cfg: SparkConf, delta: DeltaConf | None = None) -> SparkSession:
    """The session for a job; with `delta` (settings.delta) it carries what that Delta backend needs."""
    require_java()
    submitted = submitted_conf()
    if submitted is None and cfg.master.startswith("local"):
        # Local workers run this interpreter (it has pyarrow, torch and this project) and bind to loopback.
        # On a cluster, and under spark-submit, the executors' Python is the cluster's to choose.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in session_conf(cfg, submitted, delta).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def gpu_profile(spark: SparkSession, gpu: GpuConf) -> ResourceProfile | None:
    """The stage-level resource profile for the one stage that needs GPUs (encode's mapInArrow), when the
    config asks for GPUs on a cluster; None otherwise (local masters and CPU clusters).

    Every other stage asks for no GPU. With dynamic allocation the profile also asks for executors with
    `executor_amount` GPUs; without it, the executors are the session's (spark.executor.resource.gpu.*).
    """
    if gpu.executor_amount <= 0 or (spark.sparkContext.master or "local").startswith("local"):
        return None
    from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests

    builder = ResourceProfileBuilder().require(TaskResourceRequests().resource("gpu", gpu.task_amount or 1))
    if spark.sparkContext.getConf().get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        executor = ExecutorResourceRequests().resource("gpu", gpu.executor_amount, discovery_script(gpu))
        builder.require(executor)
    return builder.build
