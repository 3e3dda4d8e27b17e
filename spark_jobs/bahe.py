"""BAHE job: the behaviour table, training the deep part, publishing user and behaviour vectors.

    llmfeat bahe encode [--sample-users N]   behaviours -> behaviors_repr at bahe.split_layer (incremental)
    llmfeat bahe train  [--sample-users N]   train, log to MLflow, publish user and behaviour vectors
    spark-submit spark_jobs/bahe.py [encode|train] --config conf/local.yaml

The behaviour table is the encode job's `behaviors_repr` (spark_jobs/encode.py) run with encode.layers set to
[bahe.split_layer]: each unique behaviour text is encoded once by the LLM's first split_layer blocks, and a
re-run encodes only new or changed texts. With --sample-users N only the behaviours of N users with
history are encoded and trained on (`sample_users`: the shortest histories): a quick run (the demo); 0 = all.

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
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmfeat.config import Settings
from llmfeat.spark_jobs.bahe_fit import encode_behaviors, load_inputs, train

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


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


def run_train(spark: SparkSession, settings: Settings, n_sample: int = 0) -> BaheSummary:
    """Load, train, log to MLflow, publish: user vectors and behaviour vectors."""
    import mlflow

    from llmfeat.delta_io import open_tables
    from llmfeat.models.bahe.train import log_bahe, user_vectors
    from llmfeat.registry import use_tracking
    from llmfeat.spark_jobs.bahe_publish import behavior_rows, gated_upsert, publish_users

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
    from llmfeat.spark_jobs.materialize import format_published
    from llmfeat.spark_jobs.materialize import run as materialize

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
    from llmfeat.runner import command_settings, run_with_session

    if args.action != "evaluate":

        def body(spark: SparkSession, settings: Settings) -> None:
            if args.action == "encode":
                print(encode_behaviors(spark, settings, args.sample_users))
            else:
                print(run_train(spark, settings, args.sample_users))

        from llmfeat.models.encoder import EncoderError

        return run_with_session(f"bahe {args.action}", args.config, args.overrides, body, (EncoderError,))
    import json
    from pathlib import Path

    from llmfeat.spark_jobs.bahe_eval import evaluate, format_report

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
    from llmfeat.runner import config_args

    parser = argparse.ArgumentParser(prog="bahe")
    add_parser(parser.add_subparsers(dest="command", required=True), config_args)
    return command(parser.parse_args(["bahe", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.bahe import main as package_main

    sys.exit(package_main())
