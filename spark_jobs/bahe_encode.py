"""BAHE encode job: the behaviour table, each unique behaviour text through the LLM's first bahe.layer blocks.

    llmfeat bahe encode [--sample-users N]
    spark-submit spark_jobs/bahe_encode.py [--sample-users N] --config conf/local.yaml

The behaviour table is the encode job's `behaviors_repr` (spark_jobs/encode.py) run with encode.layers set to
[bahe.layer]: each unique behaviour text is encoded once, and a re-run encodes only new or changed texts.
With --sample-users N only the behaviours of the N users with the shortest histories before the cut are
encoded (a quick run: the demo); 0 = all.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from llmfeat.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.spark_jobs.encode import EncodeSummary


def behavior_settings(settings: Settings) -> Settings:
    """The encode settings for the behaviour table: only the shallow layers, up to the split."""
    encode = settings.encode.model_copy(update={"layers": [settings.bahe.layer]})
    return settings.model_copy(update={"encode": encode})


def sample_behaviors(spark: SparkSession, settings: Settings, n: int) -> DataFrame:
    """The behaviour ids (one column, behavior_id) of the sampled users' events before the cut."""
    from pyspark.sql import functions as F

    from llmfeat.delta_io import open_tables
    from llmfeat.sample import shortest_histories
    from llmfeat.user_text import history_cut_time

    tables = open_tables(settings, spark)
    cut = history_cut_time(spark, tables, settings.bahe.history_cut)
    users = shortest_histories(tables.read_spark("user_behaviors"), cut, n)
    ub = tables.read_spark("user_behaviors")
    return ub.where(F.col("user_id").isin(users) & (F.col("event_timestamp") < F.lit(cut))).select(
        "behavior_id"
    )


def run(spark: SparkSession, settings: Settings, n_sample: int = 0) -> EncodeSummary:
    """behaviors_repr at bahe.layer; with n_sample > 0, only the behaviours of the sampled users."""
    from llmfeat.spark_jobs.encode import run as encode

    only = sample_behaviors(spark, settings, n_sample) if n_sample else None
    return encode(spark, behavior_settings(settings), "behaviors", only=only)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_with_session

    parser = argparse.ArgumentParser(prog="bahe-encode")
    config_args(parser)
    parser.add_argument("--sample-users", type=int, default=0, help="only N users (0 = all)")
    args = parser.parse_args(argv)
    body = lambda s, c: print(run(s, c, args.sample_users))  # noqa: E731
    return run_with_session("bahe encode", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.bahe_encode import main as package_main

    sys.exit(package_main())
