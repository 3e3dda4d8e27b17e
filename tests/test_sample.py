"""The bounded sample of the in-process jobs (llmfeat/sample.py): the same users off Spark and on it, only
their rows, a hard row limit, and tables whose files differ from their rows (deletion vectors)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from llmfeat.config import SampleConf
from llmfeat.delta_io import RustDelta
from llmfeat.sample import Sample, SampleTooLarge, distinct_values, spark_user_sample

pytestmark = pytest.mark.unit


def _lake(root: Path) -> RustDelta:
    tables = RustDelta(root)
    users = [f"u{i}" for i in range(50)]
    tables.write("users", pa.table({"user_id": users, "age": list(range(50))}))
    tables.write("items", pa.table({"item_id": [f"i{i}" for i in range(30)], "text": ["t"] * 30}))
    rows = [(u, f"i{(k * 7 + j) % 30}") for k, u in enumerate(users) for j in range(4)]
    tables.write(
        "interactions",
        pa.table({
            "user_id": [u for u, _ in rows],
            "item_id": [i for _, i in rows],
            "label": [1.0] * len(rows),
            "split": ["train"] * len(rows),
        }),
    )  # fmt: skip
    return tables


def test_every_user_while_the_table_is_small_else_a_fixed_hash_sample(tmp_path: Path) -> None:
    tables = _lake(tmp_path)
    whole = Sample(tables, SampleConf())
    assert whole.users is None
    inter, users, items = whole.ctr_tables()
    assert inter.equals(tables.read_arrow("interactions")) and items.num_rows == 30 and users.num_rows == 50

    sample = Sample(tables, SampleConf(max_users=7))
    chosen = set(sample.users.to_pylist())
    assert len(chosen) == 7 and chosen == set(Sample(tables, SampleConf(max_users=7)).users.to_pylist())
    inter, users, items = sample.ctr_tables()
    assert set(inter.column("user_id").to_pylist()) == chosen == set(users.column("user_id").to_pylist())
    assert inter.num_rows == 28  # every row of those users, no other
    assert set(items.column("item_id").to_pylist()) == set(inter.column("item_id").to_pylist())
    assert sample.read("items", ["text"], item_id=["i1", "i2"]).column_names == ["text"]
    assert distinct_values(tables, "interactions", ["split", "absent"]) == {"split": ["train"]}


def test_a_read_past_max_rows_stops_and_names_the_settings(tmp_path: Path) -> None:
    tables = _lake(tmp_path)
    with pytest.raises(SampleTooLarge, match=r"interactions: .*sample.max_rows=100 .*sample.max_users"):
        Sample(tables, SampleConf(max_rows=100)).read("interactions")
    with pytest.raises(KeyError, match="no column 'nope'"):
        Sample(tables, SampleConf()).read("items", ["nope"])


def test_spark_picks_the_same_users(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tables = _lake(tmp_path)
    frame = spark.createDataFrame(tables.read_arrow("users").to_pandas())
    on_spark = {r["user_id"] for r in spark_user_sample(frame, 7).collect()}
    assert on_spark == set(Sample(tables, SampleConf(max_users=7)).users.to_pylist())


def test_rows_a_deletion_vector_removed_are_not_read(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tables = _lake(tmp_path)
    path = tables.path("interactions")
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE user_id = 'u3'")
    inter = Sample(tables, SampleConf()).read("interactions", ["user_id"])
    assert inter.num_rows == 196 and "u3" not in set(inter.column("user_id").to_pylist())
