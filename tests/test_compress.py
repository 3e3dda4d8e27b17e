"""train-compressor -> registry alias -> compress job, on tiny synthetic representation tables.

Every test gets its own data_dir and SQLite MLflow store under tmp_path.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from llmfeat.config import Settings, load_settings
from llmfeat.spark_jobs.compress import CompressError
from llmfeat.spark_jobs.compress import run as compress
from llmfeat.spark_jobs.train_compressor import run as train_compressor

pytestmark = pytest.mark.spark

DIM, LAYERS, N_USERS, N_ITEMS = 8, (2, 4), 12, 10


def repr_table(key: str, n: int, encoder: str = "tiny-lm", dim: int = DIM, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in (key, "layer", "vector", "encoder_id", "weights_hash", "pooling")}
    for k in range(n):
        for layer in LAYERS:
            rows[key].append(str(k))
            rows["layer"].append(layer)
            rows["vector"].append(rng.normal(size=dim).astype(np.float16).astype(np.float32).tolist())
            rows["encoder_id"].append(encoder)
            rows["weights_hash"].append("abc123")
            rows["pooling"].append("mean+l2")
    n_rows = len(rows[key])
    return pa.table(
        {
            **{c: v for c, v in rows.items() if c != "vector" and c != "layer"},
            "layer": pa.array(rows["layer"], pa.int32()),
            "vector": pa.array(rows["vector"], pa.list_(pa.float32())),
            "max_length": pa.array([512] * n_rows, pa.int32()),
            "content_hash": pa.array([f"h{i}" for i in range(n_rows)]),
            "encoded_at": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * n_rows, pa.timestamp("us", tz="UTC")),
        }
    )


def write_inputs(delta: Path) -> None:
    rng = np.random.default_rng(1)
    n = 600
    ts = (946_684_800 + np.sort(rng.integers(0, 10**6, n))) * 1_000_000  # from 2000-01-01
    q8, q9 = np.quantile(ts, [0.8, 0.9])
    tables = {
        "users": pa.table({"user_id": [str(k) for k in range(N_USERS)]}),
        "items": pa.table({"item_id": [str(k) for k in range(N_ITEMS)]}),
        "interactions": pa.table(
            {
                "user_id": [str(k) for k in rng.integers(0, N_USERS, n)],
                "item_id": [str(k) for k in rng.integers(0, N_ITEMS, n)],
                "label": pa.array(rng.integers(0, 2, n), pa.int32()),
                "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "split": np.where(ts < q8, "train", np.where(ts < q9, "valid", "test")).tolist(),
            }
        ),
        "users_repr": repr_table("user_id", N_USERS),
        # one demographics-only snapshot per user, before every interaction (the real job: at the first one)
        "user_snapshots_repr": repr_table("snapshot_id", N_USERS).set_column(
            0, "snapshot_id", pa.array([f"{k}@2000-01-01T00:00:00" for k in range(N_USERS) for _ in LAYERS])
        ),
        "items_repr": repr_table("item_id", N_ITEMS, seed=1),
    }
    for name, table in tables.items():
        write_deltalake(str(delta / name), table, mode="overwrite")


def tiny_settings(data_dir: Path) -> Settings:
    return load_settings(
        "tiny",
        [
            f"data_dir={data_dir}",
            "marc.layer=4",
            "marc.out_dim=3",
            "marc.hidden_dim=8",
            "marc.task_dim=4",
            "marc.max_epochs=2",
            "marc.batch_size=64",
            "marc.registry_name=test-marc",
        ],
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    write_inputs(tmp_path / "delta")
    return tiny_settings(tmp_path)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training run for the module; tests get copies of its data_dir (tables and SQLite store)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    write_inputs(root / "delta")
    summary = train_compressor(None, tiny_settings(root))
    assert [r.name for r in summary.registered] == ["test-marc-users", "test-marc-items"]
    return root


@pytest.fixture
def trained(trained_once: Path, tmp_path: Path) -> Settings:
    copy = tmp_path / "data"
    shutil.copytree(trained_once, copy)
    return tiny_settings(copy)


def test_train_registers_both_compressors_with_alias_and_lineage(trained: Settings) -> None:
    import mlflow

    from llmfeat.registry import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(trained), registry_uri=tracking_uri(trained))
    mv = client.get_model_version_by_alias("test-marc-items", "champion")
    assert mv.tags["layer"] == "4" and mv.tags["encoder_id"] == "tiny-lm" and mv.tags["in_dim"] == str(DIM)
    run = client.get_run(mv.run_id)
    assert "best_valid_auc" in run.data.metrics and run.data.params["marc.layer"] == "4"
    assert len(client.get_metric_history(mv.run_id, "valid_auc")) >= 1
    assert Path(trained.data_dir, "mlflow", "mlflow.db").exists()


def test_compress_writes_feature_tables_with_lineage(spark, trained: Settings) -> None:  # type: ignore[no-untyped-def]
    summaries = compress(spark, trained)
    assert [s.table for s in summaries] == ["user_marc_v1_features", "item_marc_v1_features"]
    users = DeltaTable(str(Path(trained.data_dir, "delta", "user_marc_v1_features"))).to_pyarrow_table()
    # a user snapshot is valid from its own time and keeps its user id
    assert users.num_rows == N_USERS and set(users["user_id"].to_pylist()) == {str(k) for k in range(N_USERS)}
    assert {t.year for t in users["event_timestamp"].to_pylist()} == {2000}
    items = DeltaTable(str(Path(trained.data_dir, "delta", "item_marc_v1_features"))).to_pyarrow_table()
    assert items.num_rows == N_ITEMS
    assert items.schema.field("vector").type == pa.list_(pa.int8())
    row = items.slice(0, 1).to_pylist()[0]
    assert len(row["vector"]) == 3 and row["scale"] > 0
    assert row["layer"] == 4 and row["encoder_id"] == "tiny-lm" and row["dtype"] == "int8"
    assert row["compressor_name"] == "test-marc-items" and row["compressor_version"] == "1"
    assert row["source_table"] == "items_repr" and row["source_version"] == 0
    # idempotent: a re-run with nothing changed commits nothing
    # items: valid from their first interaction
    first = DeltaTable(str(Path(trained.data_dir, "delta", "interactions"))).to_pandas()
    first = first.groupby("item_id")["event_timestamp"].min()
    assert {r["item_id"]: r["event_timestamp"] for r in items.to_pylist()} == first.to_dict()
    version = DeltaTable(str(Path(trained.data_dir, "delta", "item_marc_v1_features"))).version()
    compress(spark, trained, ["items"])
    assert DeltaTable(str(Path(trained.data_dir, "delta", "item_marc_v1_features"))).version() == version


def test_float16_output(spark, trained: Settings) -> None:  # type: ignore[no-untyped-def]
    settings = trained.model_copy(
        update={"marc": trained.marc.model_copy(update={"output_dtype": "float16"})}
    )
    compress(spark, settings, ["users"])
    users = DeltaTable(str(Path(trained.data_dir, "delta", "user_features"))).to_pyarrow_table()
    v = np.array(users.column("vector").to_pylist()[0], dtype=np.float32)
    assert (
        np.array_equal(v, v.astype(np.float16).astype(np.float32)) and users["dtype"][0].as_py() == "float16"
    )


def _replace_repr(settings: Settings, name: str, table: pa.Table) -> None:
    write_deltalake(
        str(Path(settings.data_dir, "delta", name)), table, mode="overwrite", schema_mode="overwrite"
    )


def _poison(table: pa.Table, key: str, row_key: str, layer: int, vector: list[float]) -> pa.Table:
    rows = table.to_pylist()
    for r in rows:
        if r[key] == row_key and r["layer"] == layer:
            r["vector"] = vector
    return pa.Table.from_pylist(rows, schema=table.schema)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan", r"items_repr: item_id='3' layer 4: NaN or inf"),
        ("inf", r"items_repr: item_id='3' layer 4: NaN or inf"),
        ("dim", r"items_repr: item_id='3' layer 4: vector has 5 values, the compressor expects 8"),
        ("missing", r"items_repr: item_id='3' has no layer-4 vector"),
        ("no_layer", r"items_repr has no layer 4.*layers in items_repr: \[2\]"),
        ("encoder", r"items_repr layer 4 was encoded by \['other-lm'\].*trained on encoder 'tiny-lm'"),
    ],
)
def test_bad_input_names_key_and_table_and_writes_nothing(
    spark, trained: Settings, change: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    table = repr_table("item_id", N_ITEMS, seed=1)
    if change == "nan":
        table = _poison(table, "item_id", "3", 4, [float("nan")] * DIM)
    elif change == "inf":
        table = _poison(table, "item_id", "3", 4, [float("inf")] + [0.0] * (DIM - 1))
    elif change == "dim":
        table = _poison(table, "item_id", "3", 4, [0.0] * 5)
    elif change == "missing":
        table = pa.Table.from_pylist(
            [r for r in table.to_pylist() if not (r["item_id"] == "3" and r["layer"] == 4)],
            schema=table.schema,
        )
    elif change == "no_layer":
        table = pa.Table.from_pylist([r for r in table.to_pylist() if r["layer"] == 2], schema=table.schema)
    else:
        table = repr_table("item_id", N_ITEMS, encoder="other-lm", seed=1)
    _replace_repr(trained, "items_repr", table)
    with pytest.raises(CompressError, match=message):
        compress(spark, trained)
    assert not Path(
        trained.data_dir, "delta", "user_marc_v1_features"
    ).exists()  # users were fine: still nothing written
    assert not Path(trained.data_dir, "delta", "item_marc_v1_features").exists()


def test_refuses_a_layer_other_than_the_compressors(spark, trained: Settings) -> None:  # type: ignore[no-untyped-def]
    settings = trained.model_copy(update={"marc": trained.marc.model_copy(update={"layer": 2})})
    with pytest.raises(
        CompressError, match="marc.layer is 2 but test-marc-users version 1 .* trained on layer 4"
    ):
        compress(spark, settings)


def test_missing_alias_is_a_clear_error(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LookupError, match="no compressor registered as test-marc-users@champion"):
        compress(spark, settings)


def test_eval_compression_writes_table_plots_and_mlflow_run(settings: Settings, tmp_path: Path) -> None:
    import mlflow
    import torch

    from llmfeat.models.evaluation.probe_eval import ProtocolConfig
    from llmfeat.models.marc.sweep import SweepConfig
    from llmfeat.registry import tracking_uri
    from llmfeat.spark_jobs.eval_compression import run as evaluate

    torch.set_num_threads(1)
    cfg = SweepConfig(seeds=1, out_dim=3, widths=(2, 3), protocol=ProtocolConfig(n_boot=10))
    result = evaluate(None, settings, cfg, tmp_path / "out")
    assert result.final_layer == 4 and result.best_layer == 2
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "marc_results.json", "marc_results.md", "marc_layers.png", "marc_bytes.png",
    }  # fmt: skip
    client = mlflow.MlflowClient(tracking_uri(settings))
    runs = client.search_runs([client.get_experiment_by_name(settings.marc.experiment).experiment_id])
    assert any(r.data.tags.get("kind") == "compression-eval" for r in runs)
