import pyarrow as pa
import pytest

from llmfeat.delta_io import RustDelta, SparkDelta, merge_predicates

pytestmark = pytest.mark.spark


def _table(rows: dict[str, str]) -> pa.Table:
    return pa.table({"k": list(rows), "v": list(rows.values())})


def test_upsert_is_idempotent_and_versions_only_changes(tmp_path, spark) -> None:
    tables = RustDelta(tmp_path, spark)
    assert tables.upsert("t", _table({"a": "1", "b": "2"}), ["k"]) == 0
    assert tables.upsert("t", _table({"a": "1", "b": "2"}), ["k"]) == 0  # nothing changed: no commit
    assert tables.upsert("t", _table({"a": "1", "b": "3", "c": "4"}), ["k"]) == 1
    rows = sorted(tables.read_arrow("t").to_pylist(), key=lambda r: r["k"])
    assert rows == [{"k": "a", "v": "1"}, {"k": "b", "v": "3"}, {"k": "c", "v": "4"}]


def test_upsert_delete_missing_mirrors_a_snapshot(tmp_path, spark) -> None:
    tables = RustDelta(tmp_path, spark)
    tables.upsert("t", _table({"a": "1", "b": "2"}), ["k"])
    tables.upsert("t", _table({"b": "2"}), ["k"], delete_missing=True)
    assert tables.read_arrow("t").column("k").to_pylist() == ["b"]


def test_spark_reads_a_pinned_snapshot(tmp_path, spark) -> None:
    tables = RustDelta(tmp_path, spark)
    tables.write("t", _table({"a": "1"}))
    tables.write("t", _table({"b": "2", "c": "3"}), mode="append")
    assert tables.read_spark("t", version=0).count() == 1
    assert tables.read_spark("t").count() == 3
    assert [h["operation"] for h in tables.history("t")] == ["WRITE", "WRITE"]
    assert tables.read_arrow("t", version=0).num_rows == 1


def test_missing_table_is_named(tmp_path, spark) -> None:
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        RustDelta(tmp_path, spark).read_arrow("nope")
    assert RustDelta(tmp_path).version("nope") is None


def test_delta_spark_without_jars_says_how_to_add_them(tmp_path, spark) -> None:
    with pytest.raises(RuntimeError, match=r"--packages io\.delta:delta-spark_2\.13.*delta-rs"):
        SparkDelta(tmp_path, spark)


@pytest.mark.unit
def test_merge_predicates_are_null_safe_in_both_dialects() -> None:
    on, changed = merge_predicates(["k"], ["k", "text", "n"], None, "datafusion")
    assert on == 't."k" = s."k"'
    assert changed == '(t."text" IS DISTINCT FROM s."text") OR (t."n" IS DISTINCT FROM s."n")'
    on, changed = merge_predicates(["k"], ["k", "n"], None, "spark")
    assert (on, changed) == ("t.`k` = s.`k`", "NOT (t.`n` <=> s.`n`)")


def test_upsert_adds_new_columns_and_stays_idempotent(tmp_path, spark) -> None:
    tables = RustDelta(tmp_path, spark)
    tables.upsert("t", _table({"a": "1", "b": "2"}), ["k"])
    wider = pa.table({"k": ["a", "c"], "v": ["1", "3"], "flag": [True, False]})
    assert tables.upsert("t", wider, ["k"], delete_missing=True) == 1
    rows = sorted(tables.read_arrow("t").to_pylist(), key=lambda r: r["k"])
    assert rows == [{"k": "a", "v": "1", "flag": True}, {"k": "c", "v": "3", "flag": False}]
    assert tables.upsert("t", wider, ["k"], delete_missing=True) == 1
