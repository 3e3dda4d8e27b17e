"""BAHE train job: the deep part over each user's behaviour sequence, logged to MLflow, vectors published.

    llmfeat bahe train [--sample-users N]
    spark-submit spark_jobs/bahe.py [--sample-users N] --config conf/local.yaml

Input: the behaviour table of the BAHE encode job (spark_jobs/bahe_encode.py) at bahe.layer. With
--sample-users N only the N users with the shortest histories before the cut are trained on and published
(the demo's quick run, the same users the encode job's sample encodes); 0 = all.

Published, each after a validation gate and with lineage:
- <bahe.feature_table> (default user_bahe_features, Feast view user_bahe_fv): one vector per user at the
  cut (marc.output_dtype), plus
  `no_history` (true: the fallback vector) and `missing_behaviors` (events whose vector was absent).
  compressor_name "bahe", compressor_version the MLflow run id. This replaces the user vectors in that table.
- behavior_features: PCA (bahe.behavior_dim) of the split-layer behaviour vectors, for the Feast view
  behavior_llm_fv (compressor_name "pca").
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import BaheConf, Settings
from llmfeat.errors import UserError
from llmfeat.models.bahe.data import BehaviorSequences, behavior_matrix, behavior_sequences
from llmfeat.models.ctr.data import CtrArrays, ctr_arrays
from llmfeat.reprs import ENCODER_LINEAGE, layer_lineage, repr_table, vector_rows
from llmfeat.sample import Sample, shortest_histories
from llmfeat.user_text import history_cut_time

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.delta_io import DeltaTables
    from llmfeat.models.bahe.model import Bahe, BaheConfig
    from llmfeat.models.bahe.train import BaheFit

log = logging.getLogger("llmfeat.bahe")
BEHAVIOR_TABLE = repr_table("behaviors")


@dataclass(frozen=True)
class BaheSummary:
    run_id: str
    valid_auc: float
    best_epoch: int
    train_seconds: float
    users: int
    no_history: int
    missing: str
    table: str
    version: int
    behavior_version: int

    def __str__(self) -> str:
        return (
            f"BAHE: valid AUC {self.valid_auc:.4f} (best epoch {self.best_epoch}), trained in "
            f"{self.train_seconds:.0f} s, run {self.run_id}\n"
            f"  {self.table}: {self.users:,} user vectors ({self.no_history:,} with no history: fallback "
            f"vector, flagged), version {self.version}; behavior_features version {self.behavior_version}\n"
            f"  {self.missing}"
        )


@dataclass
class BaheInputs:
    a: CtrArrays  # rows of the users in scope
    seqs: BehaviorSequences
    behavior_keys: np.ndarray  # (V,)
    behavior_encoded_at: pa.Array  # (V,) when each behaviour vector was encoded
    lineage: dict[str, Any]  # encoder_id, weights_hash, pooling, layer, source_version
    cut: datetime
    users: np.ndarray  # (U',) indices of the users in scope


def subset_rows(a: CtrArrays, keep: np.ndarray) -> CtrArrays:
    """The same users and items, only the rows where keep (N,) is true."""
    return CtrArrays(
        a.user_keys, a.item_keys, a.user_idx[keep], a.item_idx[keep], a.label[keep], a.split[keep],
        a.timestamp[keep], a.dense[keep], a.warm[keep],
    )  # fmt: skip


def load_inputs(spark: SparkSession | None, settings: Settings, n_sample: int = 0) -> BaheInputs:
    from llmfeat.delta_io import open_tables

    conf = settings.bahe
    tables = open_tables(settings, spark)
    if not tables.exists(BEHAVIOR_TABLE):
        raise FileNotFoundError(f"{BEHAVIOR_TABLE} not found under {tables.root}: run `llmfeat bahe encode`")
    version = tables.version(BEHAVIOR_TABLE)
    sample = Sample(tables, settings.sample, {BEHAVIOR_TABLE: version})  # llmfeat/sample.py
    a = ctr_arrays(*sample.ctr_tables())
    ub = sample.read("user_behaviors")
    seen = {} if sample.users is None else {"behavior_id": pc.unique(ub.column("behavior_id"))}
    table = sample.read(BEHAVIOR_TABLE, **seen)  # every layer: a missing one is named with those present
    keys, vectors = behavior_matrix(table, conf.layer)
    encoded_at = table.filter(pc.equal(table["layer"], conf.layer))["encoded_at"].combine_chunks()
    lineage = layer_lineage(table, BEHAVIOR_TABLE, conf.layer) | {"source_version": version}
    cut = history_cut_time(spark, tables, conf.history_cut)
    users = np.arange(len(a.user_keys))
    if n_sample:
        if spark is None:
            raise UserError("bahe train --sample-users needs Spark (run it as a job, not in-process)")
        chosen = set(shortest_histories(tables.read_spark("user_behaviors"), cut, n_sample))
        users = np.flatnonzero([k in chosen for k in a.user_keys])
        a = subset_rows(a, np.isin(a.user_idx, users))
        ub = ub.filter(pc.is_in(ub.column("user_id"), pa.array(sorted(chosen))))
    cut_us = int(cut.timestamp() * 1_000_000)
    seqs = behavior_sequences(ub, keys, vectors, a.user_keys, cut_us, conf.max_behaviors)
    return BaheInputs(a, seqs, keys, encoded_at, lineage, cut, users)


def bahe_config(conf: BaheConf, width: int, n_items: int) -> BaheConfig:
    from llmfeat.models.bahe.model import BaheConfig

    return BaheConfig(
        width, n_items, conf.deep, conf.deep_layers, conf.heads, conf.input_gain, conf.pooling,
        conf.max_behaviors, conf.compress, conf.out_dim, conf.compress_hidden, conf.keep_weight, conf.emb_dim,
        conf.dropout,
    )  # fmt: skip


def build_model(settings: Settings, width: int, n_items: int) -> Bahe:
    """deep=llm loads the configured LLM (its blocks above the split become the deep part)."""
    import torch

    from llmfeat.models.bahe.model import build_bahe

    conf = settings.bahe
    torch.manual_seed(conf.seed)
    base = None
    if conf.deep == "llm":
        from transformers import AutoModel

        from llmfeat.models.encoder import progress_bars_on_terminal, resolve_model

        source = resolve_model(settings.encode.model, settings.encode.cache_dir)
        with progress_bars_on_terminal():
            base = AutoModel.from_pretrained(source.path, dtype=torch.float32)
        log.info("loaded %s for BAHE's deep part", source.encoder_id)
    return build_bahe(bahe_config(conf, width, n_items), base, conf.layer)


def train(settings: Settings, inputs: BaheInputs) -> BaheFit:
    from llmfeat.models.bahe.train import BaheTrainConfig, fit_bahe

    c = settings.bahe
    model = build_model(settings, inputs.seqs.vectors.shape[1], len(inputs.a.item_keys))
    cfg = BaheTrainConfig(
        c.lr, c.weight_decay, c.users_per_batch, c.max_epochs, c.patience, c.seed, c.position_budget
    )
    return fit_bahe(model, inputs.seqs, inputs.a, cfg)


def sequence_hash(seqs: BehaviorSequences, keys: np.ndarray, u: int) -> str:
    """Content hash of a user's behaviour sequence (ids in order): an unchanged history, an unchanged hash."""
    ids = "\x1f".join(str(keys[b]) for b in seqs.behavior[seqs.user_events(u)])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def feature_rows(
    key: str, ids: list[str], z: np.ndarray, at: datetime | pa.Array, lineage: dict[str, Any], dtype: str
) -> pa.Table:
    """(n, d) vectors -> the feature-table schema the compress job writes (spark_jobs/compress.py)."""
    n = len(ids)
    batch = pa.RecordBatch.from_pydict(
        {
            key: pa.array(ids, pa.string()),
            "encoded_at": at
            if isinstance(at, pa.Array)
            else pa.array([at] * n, pa.timestamp("us", tz="UTC")),
            **{c: pa.array([str(lineage[c])] * n, pa.string()) for c in ENCODER_LINEAGE},
            "content_hash": pa.array(lineage["content_hash"], pa.string()),
        }
    )
    out = pa.Table.from_batches([vector_rows(batch, key, z, dtype)])
    for col, value, type_ in (
        ("source_table", BEHAVIOR_TABLE, pa.string()),
        ("source_version", lineage["source_version"], pa.int64()),
        ("layer", lineage["layer"], pa.int64()),
        ("compressor_name", lineage["compressor_name"], pa.string()),
        ("compressor_version", lineage["compressor_version"], pa.string()),
        ("dtype", dtype, pa.string()),
    ):
        out = out.append_column(col, pa.array([value] * n, type_))
    return out


def gated_upsert(tables: DeltaTables, settings: Settings, name: str, key: str, rows: pa.Table) -> int:
    """The feature-table gate (validation/) first; a failure quarantines the rows and writes nothing."""
    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import feature_suite

    dim = len(rows.column("vector")[0]) if rows.num_rows else 0
    suite = feature_suite(name, key, dim, settings.marc.output_dtype, conf=settings.validation)
    gate(rows, suite, table=name, tables=tables, run_id=new_run_id(f"bahe-{name}"), conf=settings.validation)
    return tables.upsert(name, rows, [key], delete_missing=True)


def publish_users(
    tables: DeltaTables, settings: Settings, inputs: BaheInputs, vectors: np.ndarray, run_id: str
) -> pa.Table:
    """User vectors of the users in scope at the cut, with flags and lineage (returned, not yet written)."""
    seqs, users = inputs.seqs, inputs.users
    lineage = inputs.lineage | {
        "compressor_name": "bahe",
        "compressor_version": run_id,
        "content_hash": [sequence_hash(seqs, inputs.behavior_keys, int(u)) for u in users],
    }
    ids = [str(k) for k in inputs.a.user_keys[users]]
    rows = feature_rows("user_id", ids, vectors[users], inputs.cut, lineage, settings.marc.output_dtype)
    rows = rows.append_column("no_history", pa.array(seqs.no_history[users]))
    return rows.append_column("missing_behaviors", pa.array(seqs.missing_per_user[users]))


def behavior_rows(settings: Settings, inputs: BaheInputs) -> pa.Table:
    """PCA of the split-layer behaviour vectors to bahe.behavior_dim, for behavior_llm_fv."""
    from llmfeat.models.marc.baselines import pca

    x = inputs.seqs.vectors
    d = min(settings.bahe.behavior_dim, x.shape[1], max(1, len(x) - 1))
    z = pca(x, d)(x)
    lineage = inputs.lineage | {
        "compressor_name": "pca",
        "compressor_version": f"pca-{d}-v{inputs.lineage['source_version']}",
        "content_hash": [str(k) for k in inputs.behavior_keys],
    }
    keys = [str(k) for k in inputs.behavior_keys]
    at = inputs.behavior_encoded_at.cast(pa.timestamp("us", tz="UTC"))
    return feature_rows("behavior_id", keys, z, at, lineage, settings.marc.output_dtype)


def run(spark: SparkSession, settings: Settings, n_sample: int = 0) -> BaheSummary:
    """Load, train, log to MLflow, publish: user vectors and behaviour vectors."""
    import mlflow

    from llmfeat.delta_io import open_tables
    from llmfeat.models.bahe.train import log_bahe, user_vectors
    from llmfeat.registry import use_tracking

    inputs = load_inputs(spark, settings, n_sample)
    fit = train(settings, inputs)
    vectors = user_vectors(fit.model, inputs.seqs, settings.bahe.position_budget)
    use_tracking(settings, settings.marc.experiment)
    with mlflow.start_run(run_name=f"bahe-split{settings.bahe.layer}-{settings.bahe.deep}") as active:
        log_bahe(fit, settings.bahe.model_dump(), inputs.lineage, inputs.seqs, n_sample)
    tables = open_tables(settings, spark)
    rows = publish_users(tables, settings, inputs, vectors, active.info.run_id)
    table = settings.bahe.feature_table
    version = gated_upsert(tables, settings, table, "user_id", rows)
    b_version = gated_upsert(
        tables, settings, "behavior_features", "behavior_id", behavior_rows(settings, inputs)
    )
    return BaheSummary(
        active.info.run_id, fit.history.best_score, fit.history.best_epoch, fit.seconds, len(inputs.users),
        int(inputs.seqs.no_history[inputs.users].sum()), str(inputs.seqs.missing), table, version, b_version,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="bahe")
    config_args(parser)
    parser.add_argument("--sample-users", type=int, default=0, help="only N users (0 = all)")
    args = parser.parse_args(argv)
    body = lambda s, c: print(run(s, c, args.sample_users))  # noqa: E731
    return run_with_session("bahe train", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.bahe import main as package_main

    sys.exit(package_main())
