"""Both Delta backends on the one test session (which carries the delta-spark jars the set-up resolved):
Spark DataFrames and Arrow tables in, MERGE semantics, failed writes, time travel, upkeep."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from llmfeat import delta_io
from llmfeat.config import ConfigError, load_settings
from llmfeat.delta_io import DeltaTables, RustDelta, SparkDelta, has_delta_jars, merge_predicates

pytestmark = pytest.mark.spark


def _table(rows: dict[str, str]) -> pa.Table:
    return pa.table({"k": list(rows), "v": list(rows.values())})


@pytest.fixture(params=["delta-rs", "delta-spark"])
def backend(request, spark, tmp_path: Path) -> DeltaTables:  # type: ignore[no-untyped-def]
    if request.param == "delta-rs":
        return RustDelta(tmp_path, spark)
    assert has_delta_jars(spark), "the test session has no delta-spark jars: run `make setup`"
    return SparkDelta(tmp_path, spark)


def _rows(tables: DeltaTables, name: str = "t", version: int | None = None) -> list[tuple[str, str]]:
    return sorted((r["k"], r["v"]) for r in tables.read_spark(name, version).collect())


def test_upsert_is_idempotent_and_versions_only_changes(backend: DeltaTables) -> None:
    assert backend.upsert("t", _table({"a": "1", "b": "2"}), ["k"]) == 0
    assert backend.upsert("t", _table({"a": "1", "b": "2"}), ["k"]) == 0  # nothing changed: no commit
    assert backend.upsert("t", _table({"a": "1", "b": "3", "c": "4"}), ["k"]) == 1
    assert _rows(backend) == [("a", "1"), ("b", "3"), ("c", "4")]
    assert _rows(backend, version=0) == [("a", "1"), ("b", "2")]  # time travel
    assert [h["operation"] for h in backend.history("t")][0] == "MERGE"


def test_spark_frames_write_and_merge_without_duplicates(spark, backend: DeltaTables) -> None:  # type: ignore[no-untyped-def]
    frame = spark.createDataFrame([(f"k{i}", str(i)) for i in range(50)], "k string, v string").repartition(3)
    backend.write("t", frame)
    changed = frame.selectExpr("k", "IF(k = 'k7', 'seven', v) AS v")
    backend.upsert("t", changed, ["k"])
    backend.upsert("t", changed, ["k"])  # a re-run: MERGE by key, never a duplicate
    rows = dict(_rows(backend))
    assert len(rows) == 50 and rows["k7"] == "seven" and rows["k8"] == "8"
    assert backend.read_arrow("t").num_rows == 50


def test_delete_missing_mirrors_a_snapshot_and_delete_keys(spark, backend: DeltaTables) -> None:  # type: ignore[no-untyped-def]
    backend.upsert("t", _table({"a": "1", "b": "2", "c": "3"}), ["k"])
    backend.upsert("t", _table({"b": "2", "c": "3"}), ["k"], delete_missing=True)
    assert _rows(backend) == [("b", "2"), ("c", "3")]
    backend.delete_keys("t", spark.createDataFrame([("c",)], "k string"), ["k"])
    assert _rows(backend) == [("b", "2")]


def test_upsert_adds_new_columns_and_stays_idempotent(backend: DeltaTables) -> None:
    backend.upsert("t", _table({"a": "1", "b": "2"}), ["k"])
    wider = pa.table({"k": ["a", "c"], "v": ["1", "3"], "flag": [True, False]})
    backend.upsert("t", wider, ["k"], delete_missing=True)
    rows = sorted(backend.read_arrow("t").to_pylist(), key=lambda r: r["k"])
    assert rows == [{"k": "a", "v": "1", "flag": True}, {"k": "c", "v": "3", "flag": False}]


def test_a_failed_write_keeps_the_previous_version(spark, backend: DeltaTables) -> None:  # type: ignore[no-untyped-def]
    from pyspark.sql import functions as F

    backend.write("t", _table({"a": "1"}))
    version = backend.version("t")
    # The third partition's rows fail after the others were written: nothing may be committed.
    boom = F.udf(lambda k: k if k != "k90" else 1 / 0, "string")
    frame = spark.range(100).select(F.concat(F.lit("k"), F.col("id")).alias("k")).repartition(3, "k")
    with pytest.raises(Exception, match="ZeroDivisionError"):
        backend.upsert("t", frame.select(boom("k").alias("k"), F.lit("x").alias("v")), ["k"])
    with pytest.raises(Exception, match="ZeroDivisionError"):
        backend.write("t", frame.select(boom("k").alias("k"), F.lit("x").alias("v")))
    assert backend.version("t") == version and _rows(backend) == [("a", "1")]


def test_delta_rs_merges_a_spark_frame_in_bounded_batches(spark, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sizes: list[int] = []
    real = delta_io.staged_reader

    def counting(folder: Path, schema: pa.Schema) -> pa.RecordBatchReader:
        reader = real(folder, schema)

        def batches():  # type: ignore[no-untyped-def]
            for batch in reader:
                sizes.append(batch.num_rows)
                yield batch

        return pa.RecordBatchReader.from_batches(schema, batches())

    monkeypatch.setattr(delta_io, "BATCH_ROWS", 1000)
    monkeypatch.setattr(delta_io, "staged_reader", counting)
    tables = RustDelta(tmp_path, spark)
    frame = spark.range(5000).selectExpr("CAST(id AS STRING) AS k", "array(CAST(id AS FLOAT)) AS v")
    tables.write("t", frame)  # committed as the executors' files: no batch through the driver
    assert sizes == []
    tables.upsert("t", frame.where("k < '2'"), ["k"])  # a MERGE streams its source through the driver
    assert sum(sizes) == frame.where("k < '2'").count() and max(sizes) <= 1000
    table = tables.read_arrow("t")
    assert table.num_rows == 5000 and table.schema.field("v").type.value_type == pa.float32()


def test_delta_rs_mirrors_a_spark_frame_with_no_row_through_the_driver(
    spark, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """upsert(delete_missing=True) of a Spark frame: the executors decide whether anything changed and write
    the files; the driver commits them (the MERGE would hold its whole source in the driver)."""
    monkeypatch.setattr(delta_io, "staged_reader", lambda *a: pytest.fail("a row batch went to the driver"))
    tables = RustDelta(tmp_path, spark)
    frame = spark.range(300).selectExpr("CAST(id AS STRING) AS k", "array(CAST(id AS FLOAT)) AS v")
    tables.write("t", frame)
    assert tables.upsert("t", frame, ["k"], delete_missing=True) == 0  # the same rows: no commit
    mirrored = frame.where("k != '7'").selectExpr("k", "IF(k = '8', array(CAST(-1 AS FLOAT)), v) AS v")
    assert tables.upsert("t", mirrored, ["k"], delete_missing=True) == 1
    rows = {r["k"]: r["v"] for r in tables.read_arrow("t").to_pylist()}
    assert len(rows) == 299 and "7" not in rows and rows["8"] == [-1.0] and rows["9"] == [9.0]
    assert tables.upsert("t", mirrored, ["k"], delete_missing=True) == 1  # a re-run: nothing new
    assert tables.history("t")[0]["operation"] != "MERGE"
    assert sorted(r["k"] for r in tables.read_spark("t", version=0).collect()) == sorted(
        str(i) for i in range(300)
    )


def test_spark_reads_a_delta_rs_table_with_deletion_vectors(spark, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A table delta-rs wrote, then a row deleted by Spark with deletion vectors on: its Parquet files still
    hold the row. read_spark reads 2 rows through the Delta reader, and without the jars through a copy."""
    tables = RustDelta(tmp_path, spark)
    tables.write("t", _table({"a": "1", "b": "2", "c": "3"}))
    path = tables.path("t")
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE k = 'b'")
    assert spark.read.parquet(*tables._table("t").file_uris()).count() == 3  # what a plain file read sees
    assert _rows(tables) == [("a", "1"), ("c", "3")]
    assert _rows(tables, version=0) == [("a", "1"), ("b", "2"), ("c", "3")]
    assert delta_io.count_rows(tables._table("t")) == 2  # `llmfeat tables` counts the same way
    monkeypatch.setattr(delta_io, "has_delta_jars", lambda spark: False)
    assert _rows(tables) == [("a", "1"), ("c", "3")]  # a copy of that version, written once by delta-rs
    assert (tmp_path / delta_io.STAGING / f"t-v{tables.version('t')}").is_dir()
    assert _rows(tables, version=0) == [("a", "1"), ("b", "2"), ("c", "3")]  # protocol 1: its own files


def test_maintain_compacts_vacuums_and_keeps_time_travel(spark, backend: DeltaTables, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for i in range(4):
        backend.write("t", _table({f"k{i}": str(i)}), mode="append")
    done = backend.maintain("t")
    assert (done.files_before, done.files_after, done.vacuumed) == (4, 1, 0)
    assert len(_rows(backend)) == 4 and len(_rows(backend, version=0)) == 1  # within retention: kept
    with pytest.raises(ValueError, match="below 168 h"):
        backend.maintain("t", retention_hours=24)
    if isinstance(backend, RustDelta):  # (Spark's VACUUM deletes by the same rule, in Delta's own code)
        # With no retention at all, the files only older versions need go (and with them that time travel).
        monkeypatch.setattr(delta_io, "MIN_RETENTION_HOURS", 0)
        assert backend.maintain("t", retention_hours=0).vacuumed == 4
        assert len(_rows(backend)) == 4


def test_maintain_command_refuses_a_short_retention(spark, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from llmfeat.cli import main

    RustDelta(tmp_path / "delta").write("items", _table({"a": "1"}))
    RustDelta(tmp_path / "delta").write("items", _table({"b": "2"}), mode="append")
    left = tmp_path / "delta" / delta_io.STAGING / ("0" * 32)  # what a failed write's late tasks leave
    left.mkdir(parents=True)
    os.utime(left, (0, 0))
    assert main(["maintain", "--config", "tiny", "--set", f"data_dir={tmp_path}"]) == 0
    assert not left.exists()
    assert "items: 2 -> 1 files, 0 old files vacuumed, version 2" in capsys.readouterr().out
    assert main(["maintain", "--config", "tiny", "--set", f"data_dir={tmp_path}",
                 "--set", "delta.retention_hours=24"]) == 2  # fmt: skip
    assert "delta.retention_hours" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="greater than or equal to 168"):
        load_settings("tiny", ["delta.retention_hours=100"])


def test_missing_table_is_named(tmp_path: Path, spark) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        RustDelta(tmp_path, spark).read_arrow("nope")
    assert RustDelta(tmp_path).version("nope") is None


def test_delta_spark_without_jars_says_how_to_add_them(tmp_path: Path, spark, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(delta_io, "has_delta_jars", lambda spark: False)
    with pytest.raises(
        RuntimeError, match=r"make setup.*--packages io\.delta:delta-spark_4\.1_2\.13:.*delta-rs"
    ):
        SparkDelta(tmp_path, spark)


@pytest.mark.unit
def test_merge_predicates_are_null_safe_in_both_dialects() -> None:
    on, changed = merge_predicates(["k"], ["k", "text", "n"], None, "datafusion")
    assert on == 't."k" = s."k"'
    assert changed == '(t."text" IS DISTINCT FROM s."text") OR (t."n" IS DISTINCT FROM s."n")'
    on, changed = merge_predicates(["k"], ["k", "n"], None, "spark")
    assert (on, changed) == ("t.`k` = s.`k`", "NOT (t.`n` <=> s.`n`)")


@pytest.mark.unit
def test_session_lists_the_resolved_jars_only_for_delta_spark(tmp_path: Path) -> None:
    from llmfeat.config import DeltaConf, SparkConf
    from llmfeat.session import session_conf

    (tmp_path / "delta-spark_4.1_2.13-4.4.0.jar").touch()
    (tmp_path / "delta-storage-4.4.0.jar").touch()
    delta = DeltaConf(backend="delta-spark", jars=str(tmp_path))
    conf = session_conf(SparkConf(extra={"spark.jars": "/opt/other.jar"}), delta=delta)
    jars = conf["spark.jars"].split(",")
    assert (
        jars[0] == "/opt/other.jar" and jars[1].endswith("delta-spark_4.1_2.13-4.4.0.jar") and len(jars) == 3
    )
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert "spark.jars" not in session_conf(
        SparkConf(), delta=DeltaConf(backend="delta-rs", jars=str(tmp_path))
    )
    # spark-submit's --packages (or the profile's spark.jars.packages) already bring delta-spark: left alone
    submitted = {"spark.master": "yarn", "spark.jars.packages": "io.delta:delta-spark_4.1_2.13:4.4.0"}
    assert "spark.jars" not in session_conf(SparkConf(), submitted, delta)


@pytest.mark.unit
def test_jar_coordinates_follow_the_installed_packages_and_the_cluster_profile() -> None:
    from importlib.metadata import version

    from llmfeat.delta_jars import _artifact_name, maven_coordinate
    from llmfeat.paths import conf_dir

    spark = ".".join(version("pyspark").split(".")[:2])
    assert maven_coordinate() == f"io.delta:delta-spark_{spark}_2.13:{version('delta-spark')}"
    assert maven_coordinate() in (conf_dir() / "cluster.yaml").read_text()  # its comment names the same one
    assert _artifact_name("zstd-jni-1.5.7-3.jar") == "zstd-jni"
    assert _artifact_name("delta-spark_4.1_2.13-4.4.0.jar") == "delta-spark_4.1_2.13"


@pytest.mark.unit
def test_feasts_spark_offline_store_session_gets_delta_too(tmp_path: Path) -> None:
    from llmfeat.feast_repo import store_config

    (tmp_path / "delta-spark_4.1_2.13-4.4.0.jar").touch()
    conf = store_config(load_settings("cluster", [f"delta.jars={tmp_path}"]))["offline_store"]["spark_conf"]
    assert conf["spark.jars"].endswith("delta-spark_4.1_2.13-4.4.0.jar")
    assert conf["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def test_the_set_up_resolved_the_jars_once(capsys) -> None:  # type: ignore[no-untyped-def]
    from llmfeat import delta_jars

    if not delta_jars.local_jars():
        pytest.fail(f"no delta-spark jars in {delta_jars.jar_dir()}: run `make setup`")
    assert delta_jars.main([]) == 0  # cached: Maven is not asked again
    assert delta_jars.main(["--list"]) == 0
    jars = capsys.readouterr().out.splitlines()[-1].split(",")
    assert Path(jars[0]).name == f"{'-'.join(delta_jars.coordinates())}.jar"
    assert any(Path(j).name.startswith("delta-storage-") for j in jars)


def test_appends_through_a_kept_handle_see_other_writers(tmp_path: Path) -> None:
    """The event sink's appends: one handle per table, kept; another process's commits in between are kept
    too, and each append returns the version it made."""
    sink, other = RustDelta(tmp_path), RustDelta(tmp_path)
    assert sink.append("t", _table({"a": "1"})) == 0  # the first append creates the table
    assert sink.append("t", _table({"b": "2"})) == 1
    other.write("t", _table({"c": "3"}), mode="append")  # version 2, behind the kept handle's back
    assert sink.append("t", _table({"d": "4"})) == 3
    assert sorted(sink.read_arrow("t").column("k").to_pylist()) == ["a", "b", "c", "d"]


def test_a_spark_frame_reaches_delta_rs_as_the_executors_files(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No row through the driver: the executors' Parquet files are committed as they are; an overwrite with
    other columns replaces the schema and the files, an append adds, and a failed write commits nothing."""
    from pyspark.sql import functions as F

    tables = RustDelta(tmp_path, spark)
    first = spark.createDataFrame([("a", [1.0, 2.0]), ("b", [3.0, 4.0])], "k string, v array<float>")
    first = first.withColumn("ts", F.timestamp_micros(F.lit(1_000_000)))
    assert tables.write("t", first) == 0
    got = tables.read_arrow("t")
    assert sorted(got.column("k").to_pylist()) == ["a", "b"] and got.column("v").to_pylist()[0] in (
        [1, 2],
        [3, 4],
    )
    assert str(got.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert all(f.split("/")[-2].startswith("spark-") for f in tables._table("t").file_uris())
    assert tables.write("t", spark.createDataFrame([("c", 5)], "k string, n int")) == 1
    assert tables.read_arrow("t").to_pylist() == [{"k": "c", "n": 5}]
    assert tables.write("t", spark.createDataFrame([("d", 6)], "k string, n int"), mode="append") == 2
    assert sorted(tables.read_arrow("t").column("k").to_pylist()) == ["c", "d"]
    assert sorted(tables.read_arrow("t", version=0).column("k").to_pylist()) == ["a", "b"]  # time travel
    boom = F.udf(lambda k: 1 // 0, "int")
    with pytest.raises(Exception, match="ZeroDivisionError"):
        tables.write("t", spark.createDataFrame([("e",)], "k string").withColumn("n", boom("k")))
    assert (
        tables.version("t") == 2
        and len([p for p in (tmp_path / "t").iterdir() if p.name.startswith("spark-")]) == 3
    )
