import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmfeat.delta_io import RustDelta
from llmfeat.spark_jobs.ingest import IngestError, format_summary, main, run

pytestmark = pytest.mark.spark
TABLES = ["items", "users", "interactions", "behaviors", "user_behaviors"]


def _versions(settings) -> dict[str, int | None]:
    tables = RustDelta(settings.delta_root)
    return {name: tables.version(name) for name in TABLES}


def test_tiny_ingest_writes_five_tables(spark, make_settings) -> None:
    settings = make_settings()
    summary = {s.name: s for s in run(spark, settings)}
    assert {n: summary[n].rows for n in TABLES} == {
        "items": 4,
        "users": 3,
        "interactions": 10,
        "behaviors": 9,
        "user_behaviors": 10,  # two users rated 5: GoldenEye
    }
    tables = RustDelta(settings.delta_root)
    items = {r["item_id"]: r for r in tables.read_arrow("items").to_pylist()}
    assert items["1"]["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert items["4"]["text"] == "Nameless" and items["4"]["year"] is None

    inter = tables.read_arrow("interactions").to_pandas()
    assert inter["label"].tolist() == (inter["rating"] >= 4).astype(int).tolist()
    by_split = inter.groupby("split")["event_timestamp"]
    assert (
        by_split.max()["train"] < by_split.min()["valid"] <= by_split.max()["valid"] < by_split.min()["test"]
    )
    assert str(inter["event_timestamp"].dt.tz) == "UTC"

    texts = set(tables.read_arrow("behaviors").column("text").to_pylist())
    assert "rated 5: Toy Story (1995), Animation|Children's|Comedy" in texts


def test_rerun_commits_nothing_and_changes_commit_only_what_changed(spark, make_settings, source_dir) -> None:
    settings = make_settings()
    run(spark, settings)
    first = _versions(settings)
    run(spark, settings)
    assert _versions(settings) == first  # same input: no new version, no duplicate row

    users = source_dir / "users.csv"
    users.write_text(users.read_text().replace("11,53,F,other", "11,54,F,other"))
    run(spark, settings)
    after = _versions(settings)
    assert after["users"] == first["users"] + 1  # type: ignore[operator]
    assert {k: v for k, v in after.items() if k != "users"} == {
        k: v for k, v in first.items() if k != "users"
    }
    assert RustDelta(settings.delta_root).read_arrow("users").num_rows == 3


def _corrupt(source_dir: Path, name: str, old: str | bytes, new: str | bytes) -> None:
    path = source_dir / name
    data = path.read_bytes()
    old_b = old.encode() if isinstance(old, str) else old
    new_b = new.encode() if isinstance(new, str) else new
    assert old_b in data
    path.write_bytes(data.replace(old_b, new_b, 1))


BAD_INPUT = [
    (
        "interactions.csv",
        "user_id,item_id,rating,timestamp",
        "user_id,item_id,score,timestamp",
        r"interactions\.csv: missing column\(s\) \['rating'\]",
    ),
    ("items.csv", "\n3,Four Rooms", "\n,Four Rooms", r"items\.csv: column 'item_id': null id.*Four Rooms"),
    ("users.csv", "12,23,M,writer", "10,23,M,writer", r"users\.csv: column 'user_id': duplicate id.*'10'"),
    (
        "interactions.csv",
        "1000345600",
        "last tuesday",
        r"interactions\.csv: column 'timestamp': unparsable timestamp.*last tuesday",
    ),
    ("items.csv", "GoldenEye", b"Golden\xffEye", r"items\.csv: invalid UTF-8 at line 3"),
    ("interactions.csv", "12,2,5", "12,99,5", r"interactions\.csv: column 'item_id': id not found.*'99'"),
    ("interactions.csv", "11,3,2", "11,3,two", r"column 'rating': not a number.*two"),
]


@pytest.fixture(scope="module")
def ingested(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """The tiny CSVs (conftest) ingested once: each bad-input case starts from a copy of this lake."""
    from conftest import INTERACTIONS, ITEMS, USERS

    from llmfeat.config import load_settings

    root = tmp_path_factory.mktemp("ingested")
    files = {"items": ITEMS, "users": USERS, "interactions": INTERACTIONS}
    for name, text in files.items():
        (root / f"{name}.csv").write_text(text)
    overrides = [f"ingest.files.{name}={root / name}.csv" for name in files]
    run(spark, load_settings("tiny", [f"data_dir={root / 'lake'}", "ingest.source=files", *overrides]))
    return root / "lake"


@pytest.mark.parametrize(("name", "old", "new", "message"), BAD_INPUT)
def test_bad_input_fails_naming_file_column_row_and_keeps_tables(
    spark, make_settings, source_dir, ingested, name, old, new, message
) -> None:
    settings = make_settings()
    shutil.copytree(ingested, settings.data_dir)  # the same tables the same CSVs would give
    before = _versions(settings)
    assert before["interactions"] is not None
    _corrupt(source_dir, name, old, new)
    with pytest.raises(IngestError, match=message):
        run(spark, settings)
    assert _versions(settings) == before
    assert RustDelta(settings.delta_root).read_arrow("interactions").num_rows == 10


@pytest.mark.parametrize("content", ["", "user_id,age,gender,occupation\n"])
def test_empty_file_is_named(spark, make_settings, source_dir, content) -> None:
    (source_dir / "users.csv").write_text(content)
    with pytest.raises(IngestError, match=r"users\.csv: file is empty"):
        run(spark, make_settings())


def test_job_main_exits_1_with_one_line(spark, make_settings, source_dir, tmp_path, capsys) -> None:
    (source_dir / "items.csv").write_text("")
    settings = make_settings()
    argv = ["--config", "tiny", "--set", f"data_dir={settings.data_dir}", "--set", "ingest.source=files"]
    argv += [
        f"--set=ingest.files.{k}={source_dir / (k + '.csv')}" for k in ("interactions", "items", "users")
    ]
    assert main(argv) == 1
    assert "llmfeat ingest: error:" in capsys.readouterr().err
    assert main(["--config", "tiny", "--set", "ingest.nope=1"]) == 2


LONG_TITLE = "Four Rooms " + "x" * 200_000  # a 200,000-character title


def test_long_text_is_cut_to_the_limit_and_counted(spark, make_settings, source_dir) -> None:
    _corrupt(source_dir, "items.csv", "3,Four Rooms,", f"3,{LONG_TITLE},")
    _corrupt(source_dir, "users.csv", "11,53,F,other", "11,53,F," + "o" * 3000)
    settings = make_settings()  # defaults: ingest.max_text_chars 2,000, ingest.long_text cut
    summaries = run(spark, settings)
    by = {s.name: s for s in summaries}
    assert by["items"].cut_texts == {"title": 1} and by["users"].cut_texts == {"occupation": 1}
    assert by["interactions"].cut_texts == {} and by["items"].rows == 4
    assert "texts cut to ingest.max_text_chars: items.title 1, users.occupation 1" in format_summary(
        summaries
    )
    tables = RustDelta(settings.delta_root)
    items = {r["item_id"]: r for r in tables.read_arrow("items").to_pylist()}
    assert items["3"]["title"] == LONG_TITLE[:2000]
    assert items["3"]["text"].startswith(LONG_TITLE[:2000] + " (1995)")
    assert items["1"]["title"] == "Toy Story"  # short texts untouched
    assert max(len(t) for t in tables.read_arrow("behaviors").column("text").to_pylist()) < 2100
    users = {r["user_id"]: r for r in tables.read_arrow("users").to_pylist()}
    assert users["11"]["occupation"] == "o" * 2000


def test_long_text_rejected_by_config_names_the_id_before_any_commit(
    spark, make_settings, source_dir
) -> None:
    settings = make_settings("ingest.long_text=reject", "ingest.max_text_chars=500")
    run(spark, settings)
    before = _versions(settings)
    _corrupt(source_dir, "items.csv", "3,Four Rooms,", f"3,{LONG_TITLE},")
    message = r"items\.csv: column 'title': text longer than ingest\.max_text_chars \(500 characters\)"
    message += r".*'item_id': '3', 'title_chars': 200011"
    with pytest.raises(IngestError, match=message):
        run(spark, settings)
    assert _versions(settings) == before  # nothing committed
    assert "Four Rooms" in {
        r["title"] for r in RustDelta(settings.delta_root).read_arrow("items").to_pylist()
    }


def test_column_mapping_reads_the_users_own_names(spark, make_settings, source_dir) -> None:
    _corrupt(source_dir, "interactions.csv", "user_id,item_id,rating,timestamp", "uid,iid,stars,ts")
    settings = make_settings(
        "ingest.files.columns.user_id=uid",
        "ingest.files.columns.item_id=iid",
        "ingest.files.columns.rating=stars",
        "ingest.files.columns.timestamp=ts",
    )
    assert {s.name: s.rows for s in run(spark, settings)}["interactions"] == 10


@contextmanager
def compiled_queries(spark):  # type: ignore[no-untyped-def]
    """Spark's code generation on, as the local profile runs it. The tests' session interprets queries,
    which pays on tables of a few rows; an ML-100k ingest took 50-60 s interpreted, 34-42 s compiled."""
    compiled = {"spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "FALLBACK"}
    before = {key: spark.conf.get(key) for key in compiled}
    for key, value in compiled.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            spark.conf.set(key, value)


def test_movielens_100k_real_counts_and_idempotent_rerun(spark, tmp_path) -> None:
    from llmfeat.config import load_settings

    settings = load_settings("tiny", [f"data_dir={tmp_path}"])  # ingest.source defaults to ml-100k
    with compiled_queries(spark):
        rows = {s.name: s.rows for s in run(spark, settings)}
        first = _versions(settings)
        run(spark, settings)  # the same input again: no new version, no duplicate row
        assert _versions(settings) == first
    assert (rows["interactions"], rows["users"], rows["items"]) == (100_000, 943, 1_682)
    inter = RustDelta(settings.delta_root).read_arrow("interactions").to_pandas()
    assert inter["split"].value_counts(normalize=True).round(2).to_dict() == {
        "train": 0.8,
        "valid": 0.1,
        "test": 0.1,
    }
    assert 0.54 < inter["label"].mean() < 0.56


def test_a_missing_source_fails_before_spark_starts(tmp_path: Path) -> None:
    """An error that needs no Spark (here: ingest.files unset) comes in a second, not after a JVM start."""
    cmd = [sys.executable, "-m", "llmfeat.spark_jobs.ingest", "--set", f"data_dir={tmp_path}"]
    done = subprocess.run([*cmd, "--set", "ingest.source=files"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ingest.source is files but ingest.files is not set" in done.stderr
    assert "Spark master" not in done.stderr  # log_session: no session was started
