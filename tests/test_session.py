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


def test_the_set_ups_class_archive_goes_to_a_driver_the_session_starts(tmp_path, monkeypatch) -> None:
    from llmfeat import jvm_archive

    archive = tmp_path / "spark.jsa"
    monkeypatch.setattr(jvm_archive, "archive_path", lambda: archive)
    cfg = load_settings("tiny").spark
    assert "SharedArchiveFile" not in session_conf(cfg).get("spark.driver.extraJavaOptions", "")  # none made
    archive.write_bytes(b"")
    options = session_conf(cfg)["spark.driver.extraJavaOptions"].split()
    assert options[:2] == ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]  # the profile's own come first
    assert f"-XX:SharedArchiveFile={archive}" in options and "-Xshare:auto" in options
    submitted = {"spark.master": "local[1]"}  # spark-submit started the JVM: its flags are its own
    assert "SharedArchiveFile" not in session_conf(cfg, submitted).get("spark.driver.extraJavaOptions", "")


@pytest.mark.integration
def test_a_driver_jvm_loads_sparks_classes_from_the_set_ups_archive(tmp_path) -> None:
    import subprocess
    import sys

    from llmfeat.jvm_archive import archive_path

    if not archive_path().exists():
        pytest.skip("no JVM class archive: `make setup` makes it")
    log = tmp_path / "classes.log"  # each class loaded, and where from; the session adds the archive itself
    flags = f"-Xlog:class+load=info:file={log}"
    script = "from llmfeat.config import load_settings; from llmfeat.session import build_session; "
    script += "s = build_session(load_settings('tiny').spark); s.range(3).count(); s.stop()"
    env = {**os.environ, "SPARK_SUBMIT_OPTS": flags}
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = log.read_text().splitlines()
    archived = sum("shared objects file (top)" in line for line in lines)
    # most classes came from the archive (a JVM that cannot map it reads them all from the jars, silently)
    assert archived > 0.5 * len(lines), (archived, len(lines))
