import os
import stat

import pytest

from llmfeat.config import load_settings
from llmfeat.session import SUBMIT_OWNS, JavaNotFound, require_java, session_conf, submitted_conf

pytestmark = pytest.mark.unit


def test_local_session_binds_loopback_utc_and_micros() -> None:
    conf = session_conf(load_settings("local").spark)
    assert conf["spark.driver.host"] == "127.0.0.1"
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert conf["spark.sql.parquet.outputTimestampType"] == "TIMESTAMP_MICROS"
    assert "spark.executor.resource.gpu.amount" not in conf


def test_gpu_settings_pass_through_with_the_repo_discovery_script() -> None:
    conf = session_conf(load_settings("cluster").spark)
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert "spark.task.resource.gpu.amount" not in conf  # only the encode stage asks (gpu_profile)
    script = conf["spark.executor.resource.gpu.discoveryScript"]
    assert script.endswith("conf/gpu_discovery.sh") and os.access(script, os.X_OK)
    assert "spark.driver.host" not in conf  # a real master: no loopback binding


def _fake_java(tmp_path, version: str) -> str:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2020-01-01' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return str(home)


def test_old_java_stops_with_one_actionable_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path, "11.0.2"))
    with pytest.raises(JavaNotFound, match=r"Java 17 or 21 \(found Java 11\).*openjdk-17-jre-headless"):
        require_java()


def test_missing_java_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(JavaNotFound, match="no java found"):
        require_java()


def test_java_17_passes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path, "17.0.15"))
    require_java()


def test_under_spark_submit_its_conf_wins_and_the_config_fills_gaps() -> None:
    cfg = load_settings("cluster").spark
    submitted = {"spark.master": "yarn", "spark.executor.memory": "4g", "spark.app.name": "ingest.py"}
    conf = session_conf(cfg, submitted | {"spark.sql.session.timeZone": "Europe/Paris"})
    assert not set(conf) & set(SUBMIT_OWNS) and not set(conf) & set(submitted)
    assert conf["spark.executor.cores"] == "8"  # the profile fills what spark-submit left unset
    assert conf["spark.sql.session.timeZone"] == "UTC"  # the jobs' output needs it
    own = session_conf(cfg)
    assert own["spark.master"] == cfg.master and own["spark.driver.memory"] == cfg.driver_memory


def test_no_spark_submit_gateway_means_llmfeat_starts_the_session(monkeypatch) -> None:
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert submitted_conf() is None
