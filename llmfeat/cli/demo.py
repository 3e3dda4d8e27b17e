"""`llmfeat demo`: the whole pipeline on the embedded defaults, in order, on one machine.

On CPU the LLM is the slow part, so by default the demo encodes only the compressor's source layer and cuts
user texts to their newest ~55 tokens (`DEMO_SAMPLE`: 3,458 daily user snapshots on ML-100k, one per user and
day with new behaviour, plus each user's first appearance); every other step runs on the full ML-100k tables.
`llmfeat demo --full` (or `make demo FULL=1`) encodes every configured layer at full text length.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from llmfeat.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# What the CPU sample changes, and why: one tapped layer stops the forward pass half-way through SmolLM2,
# and shorter user texts keep the encode of every user snapshot within a few minutes on 2 cores.
DEMO_SAMPLE = {"layers": "the compressor's source layer only (marc.layer)", "user_max_chars": 200}


def demo_settings(settings: Settings, full: bool) -> Settings:
    if full:
        return settings
    encode = settings.encode.model_copy(
        update={"layers": [settings.marc.layer], "user_max_chars": DEMO_SAMPLE["user_max_chars"]}
    )
    return settings.model_copy(update={"encode": encode})


def run(spark: SparkSession, settings: Settings, full: bool = False) -> None:
    from llmfeat.cli.ctr_commands import demo_step as ctr_step
    from llmfeat.delta_io import tables_summary
    from llmfeat.spark_jobs.bahe import demo_step as bahe_step
    from llmfeat.spark_jobs.compress import demo_step as marc_step
    from llmfeat.spark_jobs.encode import demo_step as encode_step
    from llmfeat.spark_jobs.ingest import format_summary
    from llmfeat.spark_jobs.ingest import run as ingest
    from llmfeat.spark_jobs.materialize import demo_step as features_step
    from llmfeat.validation.data_docs import where_note

    settings = demo_settings(settings, full)
    started = time.monotonic()
    if not full:
        print(
            f"demo sample on CPU: encode {DEMO_SAMPLE['layers']}, user texts cut to "
            f"{DEMO_SAMPLE['user_max_chars']} characters (llmfeat demo --full for everything)"
        )
    print("== ingest (MovieLens-100k from the recbole package -> Delta, input checks before any commit)")
    print(format_summary(ingest(spark, settings)))
    print("\n== published")
    print(tables_summary(settings))
    print("\n== validation (a great-expectations gate runs before every commit)")
    print(where_note(settings))
    encode_step(spark, settings)
    marc_step(spark, settings)
    features_step(spark, settings)
    ctr_step(settings)
    bahe_step(spark, settings)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
