"""The Spark encode job on local Spark, the tiny ingest tables and a tiny random-weight Llama folder."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_encoder import make_tiny_model_dir

from llmfeat.config import Settings
from llmfeat.delta_io import RustDelta
from llmfeat.models.encoder import EncoderError
from llmfeat.spark_jobs import encode
from llmfeat.user_text import user_text, user_texts

pytestmark = pytest.mark.spark
REPR_COLUMNS = [
    "item_id",
    "layer",
    "vector",
    "encoder_id",
    "weights_hash",
    "pooling",
    "max_length",
    "content_hash",
    "encoded_at",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def settings(ingested: Path, make_settings: Callable[..., Settings], tiny_model: Path) -> Settings:
    s = make_settings(
        f"encode.model={tiny_model}", "encode.layers=[1,3]", "encode.max_length=64", "encode.partitions=2"
    )
    return s


def repr_table(settings: Settings, entity: str) -> pa.Table:
    return RustDelta(settings.delta_root).read_arrow(f"{entity}_repr")


def test_items_written_once_then_rerun_encodes_nothing(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    first = encode.run(spark, settings, "items")
    assert (first.encoded, first.unchanged, first.skipped, first.truncated) == (4, 0, {}, 0)
    table = repr_table(settings, "items")
    assert table.column_names == REPR_COLUMNS and table.num_rows == 4 * 2
    rows = table.to_pylist()
    assert {(r["item_id"], r["layer"]) for r in rows} == {(i, k) for i in "1234" for k in (1, 3)}
    assert {(r["encoder_id"], r["pooling"], r["max_length"]) for r in rows} == {("tiny-llama", "mean+l2", 64)}
    vectors = np.array([r["vector"] for r in rows], dtype=np.float32)
    assert vectors.shape == (8, 32)
    np.testing.assert_array_equal(vectors, vectors.astype(np.float16).astype(np.float32))  # fp16 values
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert table.schema.field("encoded_at").type == pa.timestamp("us", tz="UTC")
    assert any("gpu none -> cpu" in d for d in first.devices)

    again = encode.run(spark, settings, "items")
    assert (again.encoded, again.unchanged, again.version) == (0, 4, first.version)
    assert "nothing to encode (4 texts unchanged)" in str(again)


def test_changed_vanished_and_empty_texts(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    encode.run(spark, settings, "items")
    tables = RustDelta(settings.delta_root)
    items = tables.read_arrow("items").to_pylist()
    items[0]["text"] = "Toy Story (1995). Genres: Comedy"  # changed: re-encoded
    items[1]["text"] = "   "  # unusable now: skipped, its old rows deleted
    tables.write("items", pa.Table.from_pylist(items[:3], schema=tables.read_arrow("items").schema))  # 4 gone

    result = encode.run(spark, settings, "items")
    assert (result.encoded, result.unchanged, result.deleted) == (1, 1, 2)
    assert result.skipped == {"empty text": 1}
    keys = sorted({r["item_id"] for r in repr_table(settings, "items").to_pylist()})
    assert keys == ["1", "3"]


def test_new_layer_reencodes_and_bad_layer_fails_early(spark, settings: Settings, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    encode.run(spark, settings, "items")
    deeper = settings.model_copy(update={"encode": settings.encode.model_copy(update={"layers": [1, 3, 4]})})
    assert encode.run(spark, deeper, "items").encoded == 4  # a missing layer means one new pass per text
    assert repr_table(settings, "items").num_rows == 4 * 3
    too_deep = settings.model_copy(update={"encode": settings.encode.model_copy(update={"layers": [2, 7]})})
    with pytest.raises(EncoderError, match=r"\[7\] beyond the 4 layers"):
        encode.run(spark, too_deep, "items")


def test_failure_midway_keeps_finished_commits_and_rerun_completes(
    spark,  # type: ignore[no-untyped-def]
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_commits = settings.model_copy(
        update={"encode": settings.encode.model_copy(update={"commit_rows": 2})}
    )
    real_rows, calls = encode.repr_rows, []

    def fail_second_commit(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("executor lost")
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(encode, "repr_rows", fail_second_commit)
    with pytest.raises(RuntimeError, match="executor lost"):
        encode.run(spark, small_commits, "items")
    done = repr_table(settings, "items").num_rows // 2
    assert 0 < done < 4
    monkeypatch.setattr(encode, "repr_rows", real_rows)
    rerun = encode.run(spark, small_commits, "items")
    assert (rerun.encoded, rerun.unchanged) == (4 - done, done)
    keys = [(r["item_id"], r["layer"]) for r in repr_table(settings, "items").to_pylist()]
    assert len(keys) == len(set(keys)) == 8


def test_users_and_behaviors_tables(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    summaries = encode.run_all(spark, settings, ["users", "behaviors"])
    assert [s.encoded for s in summaries] == [3, 9]  # 3 users; 9 distinct (rating, item) behaviours
    users = repr_table(settings, "users")
    assert users.num_rows == 3 * 2 and users.column_names[0] == "user_id"
    assert repr_table(settings, "behaviors").column_names[0] == "behavior_id"


def test_user_text_spark_and_python_agree_and_respect_the_cut(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    tables = RustDelta(settings.delta_root, spark)
    cut = datetime.fromtimestamp(1_000_518_400, UTC)  # day 7: user 10's 4th rating is on the cut
    texts = user_texts(
        tables.read_spark("users"),
        tables.read_spark("user_behaviors"),
        tables.read_spark("behaviors"),
        cut,
        max_behaviors=50,
        max_chars=120,
    )
    got = {r["user_id"]: r["text"] for r in texts.collect()}
    history = tables.read_arrow("user_behaviors").join(tables.read_arrow("behaviors"), "behavior_id")
    users = {u["user_id"]: u for u in tables.read_arrow("users").to_pylist()}
    for uid, u in users.items():
        mine = [(r["event_timestamp"], r["text"]) for r in history.to_pylist() if r["user_id"] == uid]
        expected = user_text(u["age"], u["gender"], u["occupation"], mine, cut, 50, 120)
        assert got[uid] == expected
        assert len(expected) <= 120
    # the older rating no longer fits in 120 characters: cut from the oldest side
    assert got["10"] == (
        "Age 24, gender M, occupation technician. History, oldest to newest: "
        "rated 3: GoldenEye (1995), Action|Adventure|Thriller"
    )
    assert "Four Rooms" not in got["10"]  # rated exactly at the cut: excluded
    assert got["11"].startswith("Age 53, gender F, occupation other. History, oldest to newest: ")


def test_user_snapshots_are_a_point_in_time_series(
    spark, ingested: Path, make_settings: Callable[..., Settings], tiny_model: Path
) -> None:
    """One snapshot at each user's first appearance (demographics only), then one at the start of each day
    after a day with behaviour; a text never holds a behaviour at or after its snapshot time; a re-run encodes
    nothing."""
    from llmfeat.reprs import parse_snapshot_id

    settings = make_settings(f"encode.model={tiny_model}", "encode.layers=[1]")
    tables = RustDelta(settings.delta_root, spark)
    texts = encode.entity_texts(tables, "user_snapshots", settings.encode).toPandas()
    events = tables.read_arrow("user_behaviors").to_pandas()
    titles = dict(
        zip(
            tables.read_arrow("behaviors").to_pandas()["behavior_id"],
            tables.read_arrow("behaviors").to_pandas()["text"],
            strict=True,
        )
    )
    # 10 interactions on 10 days by 3 users: 3 first appearances + 10 next-day snapshots
    assert len(texts) == 13
    for key, text in zip(texts["snapshot_id"], texts["text"], strict=True):
        user, at = parse_snapshot_id(key)
        mine = events[events["user_id"] == user]
        for ts, behavior in zip(mine["event_timestamp"], mine["behavior_id"], strict=True):
            inside = titles[behavior] in text
            assert inside == (ts.to_pydatetime() < at), (key, titles[behavior])
        if at == mine["event_timestamp"].min().to_pydatetime():
            assert text.endswith("No history yet.")
    first = encode.run(spark, settings, "user_snapshots")
    assert first.encoded == 13 and first.table == "user_snapshots_repr"
    again = encode.run(spark, settings, "user_snapshots")
    assert again.encoded == 0 and again.unchanged == 13
