"""`llmfeat bahe encode|train|evaluate`: the three BAHE jobs (spark_jobs/bahe_encode.py, bahe.py and
bahe_eval.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from llmfeat.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def add_parser(sub: Any, config_args: Any) -> None:
    from llmfeat.spark_jobs.bahe_eval import eval_args

    parser = sub.add_parser("bahe", help="BAHE: behaviour table, hierarchical user encoder, comparison")
    parser.add_argument("action", choices=["encode", "train", "evaluate"])
    parser.add_argument("--sample-users", type=int, default=0, help="encode/train: only N users (0 = all)")
    eval_args(parser)
    config_args(parser)


def command(args: argparse.Namespace) -> int:
    from llmfeat.runner import run_in_process, run_with_session
    from llmfeat.spark_jobs import bahe, bahe_encode, bahe_eval

    name = f"bahe {args.action}"
    if args.action == "evaluate":
        body = lambda s: bahe_eval.run(None, s, args.scope, args.seeds, args.fresh, args.out)  # noqa: E731
        return run_in_process(name, args.config, args.overrides, body)
    job = bahe_encode.run if args.action == "encode" else bahe.run

    def with_session(spark: SparkSession, settings: Settings) -> None:
        print(job(spark, settings, args.sample_users))

    return run_with_session(name, args.config, args.overrides, with_session)
