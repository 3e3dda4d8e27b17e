"""Streaming CTR training: the training set read back from its Parquet files in bounded, shuffled batches
(models/ctr/stream.py), the roles of its rows from two cut times (roles.py), the encoder, the DNN and
LightGBM fitted over it (stream_encoder.py, stream_train.py, tree_stream.py), and train-ctr with
ctr.stream=true on the tiny lake."""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_ctr_lake import build_lake, lake_settings, no_open_run  # noqa: F401

from llmfeat.config import ConfigError, CtrConf, Settings, load_settings
from llmfeat.models.ctr import stream as stream_module
from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.roles import ROLE_COLUMNS, RowRoles, quantile, row_roles
from llmfeat.models.ctr.stream import TrainingSetStream, scan_files
from llmfeat.models.ctr.stream_encoder import fit_columns, fit_encoder_stream
from llmfeat.models.ctr.stream_train import StreamSource, fit_model_stream
from llmfeat.models.evaluation.metrics import auc

DAY_US = 86_400_000_000
T0_US = 1_700_000_000_000_000  # November 2023, epoch microseconds


def write_training_set(folder: Path, rows: int, files: int = 4, seed: int = 0, dim: int = 8) -> list[str]:
    """A training set's Parquet files (the columns train-ctr writes, plus row_id): labels follow the dot
    product of user and item vectors and an item bias, so both the ids and the vectors carry signal. Rows are
    in time order, cut into `files` files as appends would be; splits by a 70/15/15 time cut."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(40, rows // 25), max(30, rows // 60)
    user_vec = rng.standard_normal((n_users, dim)).astype(np.float32)
    item_vec = rng.standard_normal((n_items, dim)).astype(np.float32)
    item_bias = 1.5 * rng.standard_normal(n_items)
    user, item = rng.integers(0, n_users, rows), rng.integers(0, n_items, rows)
    ts = np.sort(rng.integers(T0_US, T0_US + 60 * DAY_US, rows))
    logit = 0.7 * (user_vec[user] * item_vec[item]).sum(axis=1) + item_bias[item] - 0.5
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    cut = np.quantile(ts, [0.7, 0.85])
    split = np.where(ts < cut[0], "train", np.where(ts < cut[1], "valid", "test"))
    year = np.where(rng.random(rows) < 0.1, np.nan, rng.integers(1950, 2000, rows).astype(float))
    genres = np.array(["Drama", "Comedy|Drama", "Action", None], dtype=object)[item % 4]

    def vectors(v: np.ndarray, idx: np.ndarray) -> pa.Array:
        missing = rng.random(rows) < 0.05
        return pa.array(
            [None if m else v[i] for i, m in zip(idx, missing, strict=True)], pa.list_(pa.float32())
        )

    table = pa.table(
        {
            "row_id": pa.array(np.arange(rows)),
            "user_id": pa.array([f"u{u}" for u in user]),
            "item_id": pa.array([f"i{i}" for i in item]),
            "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "label": pa.array(label),
            "split": pa.array(split),
            "year": pa.array(year),
            "genres": pa.array(genres, pa.string()),
            "user_impressions": pa.array(rng.integers(0, 50, rows).astype(float)),
            "user_clicks": pa.array(rng.integers(0, 10, rows).astype(float)),
            "item_impressions": pa.array(rng.integers(0, 500, rows).astype(float)),
            "item_clicks": pa.array(rng.integers(0, 100, rows).astype(float)),
            "user_vector": vectors(user_vec, user),
            "item_vector": vectors(item_vec, item),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(rows), files)):
        path = folder / f"part-{k:05d}.parquet"
        pq.write_table(table.take(part), path, row_group_size=1000)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_training_set(tmp_path_factory.mktemp("stream"), 3000, files=5)


@pytest.fixture(scope="module")
def frame(files: list[str]) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def source_of(files: list[str], buffer_rows: int = 512, read_rows: int = 128) -> StreamSource:
    roles = row_roles(lambda: scan_files(files, ROLE_COLUMNS, read_rows), stop_frac=0.5, after_frac=0.6)
    return StreamSource(tuple(files), roles, buffer_rows, read_rows)


def row_ids(stream: TrainingSetStream) -> list[int]:
    return [i for table in stream.tables() for i in table.column("row_id").to_pylist()]


@pytest.mark.unit
def test_every_row_once_per_epoch_in_an_order_of_the_epoch(files: list[str], frame: pd.DataFrame) -> None:
    stream = TrainingSetStream(files, ["row_id"], batch_rows=64, buffer_rows=500, read_rows=100, seed=3)
    epochs = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        ids = row_ids(stream)
        assert Counter(ids) == Counter(frame["row_id"].tolist())  # every row, exactly once
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]
    stream.set_epoch(1)
    assert row_ids(stream) == epochs[1]  # an epoch's order is the seed's and the epoch's
    # mini-batches are whole but for the last of an epoch
    sizes = [t.num_rows for t in stream.tables()]
    assert set(sizes[:-1]) == {64} and 0 < sizes[-1] <= 64


@pytest.mark.unit
def test_buffer_shuffling_changes_the_order_not_the_content(files: list[str], frame: pd.DataFrame) -> None:
    roles = source_of(files).roles
    in_order = TrainingSetStream(files, ["row_id"], roles, "fit", read_rows=100, shuffle=False)
    shuffled = TrainingSetStream(
        files, ["row_id"], roles, "fit", batch_rows=50, buffer_rows=400, read_rows=100
    )
    other_seed = TrainingSetStream(
        files, ["row_id"], roles, "fit", batch_rows=50, buffer_rows=400, read_rows=100, seed=1
    )
    fit_rows = frame.loc[roles.mask(pa.Table.from_pandas(frame), "fit"), "row_id"].tolist()
    assert row_ids(in_order) == fit_rows  # unshuffled: the files' own order
    a, b = row_ids(shuffled), row_ids(other_seed)
    assert sorted(a) == sorted(b) == sorted(fit_rows) and len(set(a)) == len(a)
    assert a != fit_rows and a != b
    # a mini-batch mixes rows from far apart: the buffer spans read batches (and files), not one run of rows
    first = next(shuffled.tables()).column("row_id").to_numpy()
    assert first.max() - first.min() > 100


@pytest.mark.unit
@pytest.mark.parametrize(
    ("buffer_rows", "read_rows", "batch_rows"), [(300, 100, 64), (64, 500, 64), (1000, 7, 1)]
)
def test_rows_held_at_once_never_pass_buffer_plus_read_batch(
    files: list[str], monkeypatch: pytest.MonkeyPatch, buffer_rows: int, read_rows: int, batch_rows: int
) -> None:
    """Counted from outside the buffer: rows read from the files minus rows handed out, at every batch."""
    read = [0]
    file_batches = stream_module.file_batches

    def counted(path: str, columns: list[str], n: int) -> Iterator[pa.RecordBatch]:
        for batch in file_batches(path, columns, n):
            read[0] += batch.num_rows
            yield batch

    monkeypatch.setattr(stream_module, "file_batches", counted)
    stream = TrainingSetStream(files, ["row_id"], None, None, None, batch_rows, buffer_rows, read_rows)
    held, given = [], 0
    for table in stream.tables():
        held.append(read[0] - given)  # in the stream: the rows of this batch and those not yet handed out
        given += table.num_rows
    assert given == read[0] == 3000
    assert max(held) <= buffer_rows + read_rows and stream.peak_rows <= buffer_rows + read_rows
    assert max(held) >= buffer_rows  # it did fill: the bound is not met by holding nothing


@pytest.mark.unit
def test_quantile_is_numpys_to_the_last_bit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(T0_US, T0_US + int(rng.choice([10, 10**6, 10**12])), int(rng.integers(1, 2000)))
        chunks = np.array_split(values, int(rng.integers(1, 6)))
        q = float(rng.choice([0.0, 1.0, 0.5, rng.random()]))
        assert quantile(lambda chunks=chunks: iter(chunks), q) == float(np.quantile(values, q))
    assert math.isnan(quantile(lambda: iter([np.zeros(0, np.int64)]), 0.5))


@pytest.mark.unit
def test_roles_are_split_masks_and_after_marc(files: list[str], frame: pd.DataFrame) -> None:
    from llmfeat.config import MarcConf
    from llmfeat.models.ctr.train import after_marc
    from llmfeat.spark_jobs.training_set import split_masks

    marc = MarcConf()
    roles = row_roles(lambda: scan_files(files, ROLE_COLUMNS, 100), 0.5, marc.fit_frac + marc.stop_frac)
    table = pa.Table.from_pandas(frame)
    for name, mask in split_masks(frame, 0.5).items():
        np.testing.assert_array_equal(roles.mask(table, name), mask)  # type: ignore[arg-type]
    residual = np.zeros(len(frame), bool)
    residual[after_marc(frame, marc)] = True
    np.testing.assert_array_equal(roles.mask(table, "residual"), residual & split_masks(frame, 0.5)["fit"])
    no_valid = row_roles(lambda: scan_files(files, ROLE_COLUMNS, 100), 0.5)
    assert no_valid.after_cut == -math.inf and RowRoles(math.inf).mask(table, "valid").sum() == 0


@pytest.mark.unit
def test_stream_encoder_fits_what_the_frame_encoder_fits(files: list[str], frame: pd.DataFrame) -> None:
    source = source_of(files)
    masks = {r: source.roles.mask(pa.Table.from_pandas(frame), r) for r in ("fit", "train")}  # type: ignore[arg-type]
    expected = FeatureEncoder.fit(frame, frame["label"].to_numpy(), masks["fit"], masks["train"], True)
    schema = source.schema()
    got = fit_encoder_stream(source.scan(fit_columns(schema, True)), schema, source.roles, True)
    assert got.user_ids == expected.user_ids and got.item_ids == expected.item_ids
    assert got.genres == expected.genres and got.fresh == expected.fresh
    assert got.base_ctr == pytest.approx(expected.base_ctr)
    assert (got.year_mean, got.year_std) == pytest.approx((expected.year_mean, expected.year_std))
    for col in ("user_vector", "item_vector"):
        np.testing.assert_allclose(got.vec_mean[col], expected.vec_mean[col], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.vec_std[col], expected.vec_std[col], rtol=1e-4)


def auc_on_test(model_encoder: tuple[torch.nn.Module, FeatureEncoder], frame: pd.DataFrame) -> float:
    model, encoder = model_encoder
    test = frame[frame["split"] == "test"]
    with torch.no_grad():
        p = torch.sigmoid(model(encoder.transform(test))).numpy()  # type: ignore[operator]
    return auc(test["label"].to_numpy(), p)


@pytest.mark.unit
def test_dnn_learns_over_the_stream_and_one_seed_gives_one_model(
    files: list[str], frame: pd.DataFrame
) -> None:
    source = source_of(files)
    cfg = CtrConf(max_epochs=3, batch_size=64, hidden=[16], stream=True, stream_buffer_rows=512)
    logged: dict[str, float] = {}
    model, encoder = fit_model_stream(source, True, cfg, lambda m, step: logged.update(m))
    again, _ = fit_model_stream(source, True, cfg)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert auc_on_test((model, encoder), frame) > 0.7
    assert logged["id_valid_auc"] > 0.6 and "residual_valid_fold_logloss" in logged
    other, _ = fit_model_stream(source, True, cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(
        other.state_dict()["fields.user_emb.weight"], model.state_dict()["fields.user_emb.weight"]
    )


@pytest.mark.unit
def test_lightgbm_boosts_from_sequences_and_one_seed_gives_one_model(
    files: list[str], frame: pd.DataFrame
) -> None:
    from llmfeat.models.ctr.pyfunc import tree_ranker
    from llmfeat.models.ctr.stream_encoder import input_columns
    from llmfeat.models.ctr.tree import tree_matrix
    from llmfeat.models.ctr.tree_stream import fit_tree_stream, role_rows

    source = source_of(files)
    cfg = CtrConf(kind="lightgbm", tree_min_leaf=20, tree_threads=1, tree_rounds=200)
    booster, encoder = fit_tree_stream(source, True, cfg)
    again, _ = fit_tree_stream(source, True, cfg)
    assert booster.model_to_string() == again.model_to_string()
    test = frame[frame["split"] == "test"]
    assert auc(test["label"].to_numpy(), tree_ranker(booster, encoder).score(test)) > 0.7
    # a Sequence gives, by position and by slice, the rows tree_matrix makes of the role's rows
    columns = [*input_columns(encoder, source.schema()), *ROLE_COLUMNS]
    seqs, labels = role_rows(source, "valid", encoder, columns, None, 0)
    valid = frame[source.roles.mask(pa.Table.from_pandas(frame), "valid")]
    expected = tree_matrix(encoder.transform(valid))
    got = np.concatenate([s[0 : len(s)] for s in seqs])
    np.testing.assert_array_equal(got, expected.astype(np.float64))
    np.testing.assert_array_equal(labels, valid["label"].to_numpy(np.float32))
    np.testing.assert_array_equal(seqs[-1][len(seqs[-1]) - 1], got[-1])  # back to a late row after a restart


@pytest.mark.unit
def test_stream_settings_that_cannot_work_are_config_errors_naming_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"ctr.stream_buffer_rows=100 .* ctr.batch_size=1024"):
        load_settings("tiny", ["ctr.stream=true", "ctr.stream_buffer_rows=100"])
    assert load_settings("tiny", ["ctr.stream_buffer_rows=100"]).ctr.stream is False  # off: not checked
    with pytest.raises(ConfigError, match=r"ctr.stream_workers=2 .* ctr.stream=true"):
        load_settings("tiny", ["ctr.stream_workers=2"])
    with pytest.raises(ConfigError, match=r"ctr.stream_table='t_\{x\}': the only placeholder is \{service\}"):
        load_settings("tiny", ["ctr.stream_table=t_{x}"])


WORKER_CFG = CtrConf(max_epochs=3, batch_size=64, hidden=[16], stream=True, stream_buffer_rows=512)


def train_as_worker(rank: int, files: list[str], folder: str, port: int) -> None:
    """One of two workers (a spawned process): join the group on loopback, train, save what comes back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from llmfeat.spark_jobs.train_ctr import train_on_worker

    state, encoder, logged = train_on_worker(source_of(files), True, WORKER_CFG)
    torch.save({"state": state, "encoder": encoder, "logged": logged}, Path(folder) / f"rank{rank}.pt")


@pytest.mark.unit
def test_two_workers_hold_one_model_trained_on_their_shares(
    files: list[str], frame: pd.DataFrame, tmp_path: Path
) -> None:
    """torch.distributed on loopback, as TorchDistributor starts it: the workers average their gradients,
    so they end with the same weights, and the model learns from both shares."""
    from test_cluster import free_port

    from llmfeat.models.ctr.model import CtrModel
    from llmfeat.models.ctr.train import model_config

    args = (files, str(tmp_path), free_port())
    torch.multiprocessing.start_processes(train_as_worker, args=args, nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, weights in ranks[0]["state"].items():
        torch.testing.assert_close(weights, ranks[1]["state"][name], rtol=0, atol=0, msg=name)
    model = CtrModel(model_config(WORKER_CFG, ranks[0]["encoder"]))
    model.load_state_dict(ranks[0]["state"])
    assert auc_on_test((model.eval(), ranks[0]["encoder"]), frame) > 0.7
    # every worker scored the whole valid set and agreed on it: one selection, the same epochs
    valid = [[m["id_valid_auc"] for m, _ in r["logged"] if "id_valid_auc" in m] for r in ranks]
    assert valid[0] == valid[1] and len(valid[0]) == WORKER_CFG.max_epochs


# The driver of the cluster test (test_cluster.py): a session on the standalone master, TorchDistributor's two
# tasks (one on each worker) train on the files, rank 0's model comes back; prints what the test checks.
ON_CLUSTER = textwrap.dedent(
    """
    import json, sys
    from conftest import SHORT_LIVED_JVM
    from test_ctr_stream import WORKER_CFG, auc_on_test, source_of
    import pandas as pd, pyarrow.parquet as pq
    from llmfeat.config import load_settings
    from llmfeat.session import build_session
    from llmfeat.spark_jobs.train_ctr import fit_on_workers

    master, data_dir, *files = sys.argv[1:]
    executors = ["spark.extra.spark.executor.memory=1g", "spark.extra.spark.executor.cores=1",
                 f"spark.extra.spark.executor.extraJavaOptions={SHORT_LIVED_JVM}"]
    overrides = [f"spark.master={master}", f"data_dir={data_dir}", "spark.driver_memory=1g", *executors,
                 "spark.extra.spark.cores.max=2"]
    settings = load_settings("tiny", overrides)
    spark = build_session(settings.spark, settings.delta)
    cfg = WORKER_CFG.model_copy(update={"stream_workers": 2})
    logged = []
    model, encoder = fit_on_workers(cfg, source_of(files), True, lambda m, step: logged.append((m, step)))
    frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()
    epochs = sum("id_valid_auc" in m for m, _ in logged)
    print(json.dumps({"auc": auc_on_test((model, encoder), frame), "epochs": epochs,
                      "executors": len(infos) - 1}))
    """
)


STREAM = ("ctr.stream=true", "ctr.stream_buffer_rows=256", "ctr.stream_batch_rows=64")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return build_lake(tmp_path_factory.mktemp("streamed"), *STREAM)


@pytest.mark.integration
def test_train_ctr_streams_the_set_it_builds_and_leaves_no_scratch_files(lake: Settings) -> None:
    import mlflow

    from llmfeat.delta_io import RustDelta
    from llmfeat.feast_repo import open_store
    from llmfeat.models.ctr.pyfunc import load_ranker
    from llmfeat.registry import tracking_uri
    from llmfeat.spark_jobs.train_ctr import run as train
    from llmfeat.spark_jobs.training_set import build_frame

    [dnn] = train(None, lake, use_llm=True, alias="challenger")
    uri = tracking_uri(lake)
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(dnn.run_id)
    assert run.data.params["ctr.stream"] == "True" and run.data.params["rows"] == "720"
    assert {"test_auc", "valid_auc", "test_cold_auc"} <= set(run.data.metrics)
    # both stages' streams held at most a buffer and a read batch of rows
    assert 0 < run.data.metrics["id_stream_peak_rows"] <= 256 + 64
    assert 0 < run.data.metrics["residual_stream_peak_rows"] <= 256 + 64
    assert dnn.test["auc"].mean > 0.6  # the tiny lake's labels follow the vectors
    assert not list(Path(lake.data_dir).glob("train-ctr-stream-*"))  # the scratch files are gone
    frame, _ = build_frame(lake, RustDelta(lake.delta_root), open_store(lake), ["ctr_marc_v2"], "test")
    mlflow.set_tracking_uri(uri)
    p = load_ranker(f"models:/llmfeat-ctr/{dnn.version}").score(frame)
    assert auc(frame["label"].to_numpy(), p) == pytest.approx(dnn.test["auc"].mean, abs=0.05)


@pytest.mark.integration
def test_train_ctr_streams_a_training_set_table_whole(lake: Settings) -> None:
    import mlflow

    from llmfeat.delta_io import RustDelta
    from llmfeat.errors import UserError
    from llmfeat.feast_repo import open_store
    from llmfeat.registry import tracking_uri
    from llmfeat.spark_jobs.train_ctr import run as train
    from llmfeat.spark_jobs.training_set import build_frame

    table = ("ctr.stream_table=training_set_{service}",)
    trees = lake_settings(Path(lake.data_dir), *STREAM, *table, "ctr.kind=lightgbm", "ctr.tree_min_leaf=5")
    with pytest.raises(UserError, match=r"ctr.stream_table='training_set_\{service\}': no Delta table "):
        train(None, trees, use_llm=False)
    tables = RustDelta(lake.delta_root)
    frame, _ = build_frame(lake, tables, open_store(lake), ["ctr_id_v2"])  # as the Spark job writes it
    version = tables.write("training_set_ctr_id_v2", frame)
    [tree] = train(None, trees, use_llm=False, alias="champion")
    run = mlflow.MlflowClient(tracking_uri=tracking_uri(lake)).get_run(tree.run_id)
    assert run.data.tags["training_set.table"] == "training_set_ctr_id_v2"
    assert run.data.tags["delta.training_set_ctr_id_v2.version"] == str(version)
    assert run.data.tags["model.family"] == "lightgbm" and "test_auc" in run.data.metrics
