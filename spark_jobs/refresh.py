"""The daily refresh: new snapshots and items encoded, compressed and materialized, in one command.

    llmfeat refresh [--config local|PATH] [--set key=value ...]
    spark-submit spark_jobs/refresh.py --config conf/cluster.yaml

Each step is incremental: the encode job encodes only the user-days and items it has not encoded yet (by
content hash), compress rewrites the feature tables with the registered compressor, and materialize moves
the online store up to now (`feast materialize-incremental`), so that it serves each user's latest snapshot:
the vector the offline point-in-time join gives a row stamped now.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from llmfeat.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def run(spark: SparkSession, settings: Settings) -> None:
    from llmfeat.spark_jobs import compress, encode, materialize

    encode.run_all(spark, settings, ["items", "user_snapshots"])
    for summary in compress.run(spark, settings):
        print(summary, flush=True)
    print(materialize.format_published(materialize.run(spark, settings)), flush=True)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import job_main

    return job_main("refresh", argv, run)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.refresh import main as package_main

    sys.exit(package_main())
