"""BAHE job: the behaviour table, training the deep part, publishing user and behaviour vectors.

    llmfeat bahe encode [--sample-users N]   behaviours -> behaviors_repr at bahe.split_layer (incremental)
    llmfeat bahe train  [--sample-users N]   train, log to MLflow, publish user and behaviour vectors
    spark-submit spark_jobs/bahe.py [encode|train] --config conf/local.yaml

The behaviour table is the encode job's `behaviors_repr` (spark_jobs/encode.py) run with encode.layers set to
[bahe.split_layer]: each unique behaviour text is encoded once by the LLM's first split_layer blocks, and a
re-run encodes only new or changed texts. With --sample-users N only the behaviours of N users with
history are encoded and trained on (`sample_users`: the shortest histories): a quick run (the demo); 0 = all.

Published, each after a validation gate and with lineage:
- <bahe.feature_table> (default user_features): one vector per user at the cut (marc.output_dtype), plus
  `no_history` (true: the fallback vector) and `missing_behaviors` (events whose vector was absent).
  compressor_name "bahe", compressor_version the MLflow run id. This replaces the user vectors in that table.
- behavior_features: PCA (bahe.behavior_dim) of the split-layer behaviour vectors, for the Feast view
  behavior_llm_fv (compressor_name "pca").
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import BaheConf, Settings
from models.bahe_data import BehaviorSequences, behavior_matrix, behavior_sequences
from models.ctr_data import CtrArrays, ctr_arrays

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from models.bahe import Bahe, BaheConfig
    from models.train_bahe import BaheFit
    from spark_jobs.delta_io import DeltaTables
    from spark_jobs.encode import EncodeSummary

log = logging.getLogger("llmfeat.bahe")
BEHAVIOR_TABLE = "behaviors_repr"


@dataclass
class BaheInputs:
    a: CtrArrays  # rows of the users in scope
    seqs: BehaviorSequences
    behavior_keys: np.ndarray  # (V,)
    behavior_encoded_at: pa.Array  # (V,) when each behaviour vector was encoded
    lineage: dict[str, Any]  # encoder_id, weights_hash, pooling, layer, source_version
    cut: datetime
    users: np.ndarray  # (U',) indices of the users in scope


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


def behavior_settings(settings: Settings) -> Settings:
    """The encode settings for the behaviour table: only the shallow layers, up to the split."""
    encode = settings.encode.model_copy(update={"layers": [settings.bahe.split_layer]})
    return settings.model_copy(update={"encode": encode})


def cut_time(spark: SparkSession | None, tables: DeltaTables, cut: str) -> datetime:
    """bahe.history_cut as a time: the first event of a split ("valid") or an ISO time; Spark is optional."""
    from spark_jobs.user_text import history_cut

    if spark is not None:
        return history_cut(tables.read_spark("interactions"), cut)
    if cut not in ("valid", "test"):
        return datetime.fromisoformat(cut)
    inter = tables.read_arrow("interactions")
    first = pc.min(inter.filter(pc.equal(inter["split"], cut))["event_timestamp"]).as_py()
    if first is None:
        raise ValueError(f"bahe.history_cut {cut!r}: the interactions table has no {cut!r} rows")
    return first  # type: ignore[no-any-return]


def sample_users(spark: SparkSession, tables: DeltaTables, conf: BaheConf, n: int) -> list[str]:
    """A documented quick sample: the n users with the fewest behaviours before the cut (at least one), ties
    by user id. Their histories are short, so few behaviours need encoding."""
    from pyspark.sql import functions as F

    cut = cut_time(spark, tables, conf.history_cut)
    ub = tables.read_spark("user_behaviors").where(F.col("event_timestamp") < F.lit(cut))
    counts = ub.groupBy("user_id").count().collect()
    return [
        r["user_id"] for r in sorted(counts, key=lambda r: (r["count"], len(r["user_id"]), r["user_id"]))[:n]
    ]


def sample_behaviors(spark: SparkSession, tables: DeltaTables, conf: BaheConf, users: list[str]) -> DataFrame:
    """The behaviour ids of the sampled users' events before the cut (one column, behavior_id)."""
    from pyspark.sql import functions as F

    cut = cut_time(spark, tables, conf.history_cut)
    ub = tables.read_spark("user_behaviors")
    return ub.where(F.col("user_id").isin(users) & (F.col("event_timestamp") < F.lit(cut))).select(
        "behavior_id"
    )


def encode_behaviors(spark: SparkSession, settings: Settings, n_sample: int = 0) -> EncodeSummary:
    """behaviors_repr at the split layer; with n_sample > 0, only the behaviours of the sampled users."""

    from spark_jobs.delta_io import open_tables
    from spark_jobs.encode import run

    only: DataFrame | None = None
    if n_sample:
        tables = open_tables(settings, spark)
        users = sample_users(spark, tables, settings.bahe, n_sample)
        only = sample_behaviors(spark, tables, settings.bahe, users)
    return run(spark, behavior_settings(settings), "behaviors", only=only)


def subset_rows(a: CtrArrays, keep: np.ndarray) -> CtrArrays:
    """The same users and items, only the rows where keep (N,) is true."""
    return CtrArrays(
        a.user_keys, a.item_keys, a.user_idx[keep], a.item_idx[keep], a.label[keep], a.split[keep],
        a.timestamp[keep], a.dense[keep], a.warm[keep],
    )  # fmt: skip


def load_inputs(spark: SparkSession | None, settings: Settings, n_sample: int = 0) -> BaheInputs:
    from spark_jobs.delta_io import open_tables
    from spark_jobs.train_compressor import layer_lineage

    conf = settings.bahe
    tables = open_tables(settings, spark)
    a = ctr_arrays(tables.read_arrow("interactions"), tables.read_arrow("users"), tables.read_arrow("items"))
    if not tables.exists(BEHAVIOR_TABLE):
        raise FileNotFoundError(f"{BEHAVIOR_TABLE} not found under {tables.root}: run `llmfeat bahe encode`")
    version = tables.version(BEHAVIOR_TABLE)
    table = tables.read_arrow(BEHAVIOR_TABLE, version)
    keys, vectors = behavior_matrix(table, conf.split_layer)
    encoded_at = table.filter(pc.equal(table["layer"], conf.split_layer))["encoded_at"].combine_chunks()
    lineage = layer_lineage(table, BEHAVIOR_TABLE, conf.split_layer) | {"source_version": version}
    cut = cut_time(spark, tables, conf.history_cut)
    ub = tables.read_arrow("user_behaviors")
    users = np.arange(len(a.user_keys))
    if n_sample:
        if spark is None:
            raise ValueError("a user sample needs Spark")
        chosen = set(sample_users(spark, tables, conf, n_sample))
        users = np.flatnonzero([k in chosen for k in a.user_keys])
        a = subset_rows(a, np.isin(a.user_idx, users))
        ub = ub.filter(pc.is_in(ub.column("user_id"), pa.array(sorted(chosen))))
    cut_us = int(cut.timestamp() * 1_000_000)
    seqs = behavior_sequences(ub, keys, vectors, a.user_keys, cut_us, conf.max_behaviors)
    return BaheInputs(a, seqs, keys, encoded_at, lineage, cut, users)


def bahe_config(conf: BaheConf, width: int, n_items: int) -> BaheConfig:
    from models.bahe import BaheConfig

    return BaheConfig(
        width, n_items, conf.deep, conf.deep_layers, conf.heads, conf.input_gain, conf.pooling,
        conf.max_behaviors, conf.compress, conf.out_dim, conf.compress_hidden, conf.keep_weight, conf.emb_dim,
        conf.dropout,
    )  # fmt: skip


def build_model(settings: Settings, width: int, n_items: int) -> Bahe:
    """deep=llm loads the configured LLM (its blocks above the split become the deep part)."""
    import torch

    from models.bahe import build_bahe

    conf = settings.bahe
    torch.manual_seed(conf.seed)
    base = None
    if conf.deep == "llm":
        from transformers import AutoModel

        from models.encoder import resolve_model

        source = resolve_model(settings.encode.model, settings.encode.cache_dir)
        base = AutoModel.from_pretrained(source.path, dtype=torch.float32)
    return build_bahe(bahe_config(conf, width, n_items), base, conf.split_layer)


def train(settings: Settings, inputs: BaheInputs) -> BaheFit:
    from models.train_bahe import BaheTrainConfig, fit_bahe

    c = settings.bahe
    model = build_model(settings, inputs.seqs.vectors.shape[1], len(inputs.a.item_keys))
    cfg = BaheTrainConfig(
        c.lr, c.weight_decay, c.users_per_batch, c.max_epochs, c.patience, c.seed, c.position_budget
    )
    return fit_bahe(model, inputs.seqs, inputs.a, cfg)


def run_train(spark: SparkSession, settings: Settings, n_sample: int = 0) -> BaheSummary:
    """Load, train, log to MLflow, publish: user vectors and behaviour vectors."""
    import mlflow
    from models.registry import use_tracking
    from models.train_bahe import log_bahe, user_vectors
    from spark_jobs.bahe_publish import behavior_rows, gated_upsert, publish_users
    from spark_jobs.delta_io import open_tables

    inputs = load_inputs(spark, settings, n_sample)
    fit = train(settings, inputs)
    vectors = user_vectors(fit.model, inputs.seqs, settings.bahe.position_budget)
    use_tracking(settings)
    with mlflow.start_run(run_name=f"bahe-split{settings.bahe.split_layer}-{settings.bahe.deep}") as active:
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


def demo_step(spark: SparkSession, settings: Settings) -> None:
    """Behaviour table, training and publication on a sample (bahe.demo_users; 0 = everyone), then Feast."""
    from spark_jobs.materialize import format_published
    from spark_jobs.materialize import run as materialize

    n, conf = settings.bahe.demo_users, settings.bahe
    sample = f"{n} users with the shortest histories (--set bahe.demo_users=0 for all)" if n else "all users"
    print(
        f"\n== BAHE: behaviours through blocks 1..{conf.split_layer}, {conf.deep_layers} trainable "
        f"{conf.deep} blocks over each user's behaviours -> {conf.feature_table}; sample: {sample}"
    )
    print(encode_behaviors(spark, settings, n))
    print(run_train(spark, settings, n))
    print(format_published(materialize(spark, settings)))


def add_parser(sub: Any, config_args: Any) -> None:
    parser = sub.add_parser("bahe", help="BAHE: behaviour table, hierarchical user encoder, comparison")
    parser.add_argument("action", choices=["encode", "train", "evaluate"])
    parser.add_argument("--sample-users", type=int, default=0, help="encode/train: only N users (0 = all)")
    parser.add_argument("--scope", choices=["eval", "all"], default="eval", help="evaluate: baseline users")
    parser.add_argument("--seeds", type=int, default=3, help="evaluate: probe seeds")
    parser.add_argument("--fresh", action="store_true", help="evaluate: recompute cached phases")
    parser.add_argument("--out", default=None, help="evaluate: JSON results path")
    config_args(parser)


def command(args: argparse.Namespace) -> int:
    from llmfeat.cli import _run_with_session, command_settings

    if args.action != "evaluate":

        def body(spark: SparkSession, settings: Settings) -> None:
            if args.action == "encode":
                print(encode_behaviors(spark, settings, args.sample_users))
            else:
                print(run_train(spark, settings, args.sample_users))

        return _run_with_session(f"bahe {args.action}", args.config, args.overrides, body)
    import json
    from pathlib import Path

    from models.bahe_eval import evaluate, format_report

    settings = command_settings("bahe evaluate", args.config, args.overrides)
    if settings is None:
        return 2
    results = evaluate(settings, args.scope, args.seeds, fresh=args.fresh)
    out = Path(args.out or Path(settings.data_dir) / "bahe_eval" / "results.json")
    out.write_text(json.dumps(results, indent=1, default=float))
    print(format_report(results))
    print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from llmfeat.cli import config_args

    parser = argparse.ArgumentParser(prog="bahe")
    add_parser(parser.add_subparsers(dest="command", required=True), config_args)
    return command(parser.parse_args(["bahe", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from spark_jobs.bahe import main as package_main

    sys.exit(package_main())
