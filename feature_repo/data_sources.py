"""Data sources: the Feast-facing Delta tables that `llmfeat features materialize` publishes.

The compress job stores vectors as float16 (or int8 with a per-row scale) to save bytes; Feast serves
Array(Float32), so the publish step decodes them once into `feast_*` tables with a checked, fixed dimension.

MARC vectors have one table per compressor version (`marc_source`): feast_user_marc_v<N> and
feast_item_marc_v<N> hold what version N made of the whole history, so a new version never overwrites the
vectors an older model was trained on.

Where the tables are: <data dir>/delta/<table>. The data dir is $LLMFEAT_DATA_DIR, else ../data/local: the
embedded default of a checkout, relative to this folder (Feast resolves relative paths against the repo).
Clusters (offline_store: spark): the SparkSource twins read the same tables by name from the metastore
(register each once, e.g. CREATE TABLE feast_item_marc_v1 USING DELTA
LOCATION '<data dir>/delta/feast_item_marc_v1').
"""

import os

from feast import FileSource
from feast.data_format import DeltaFormat
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

TIMESTAMP = "event_timestamp"
DATA_DIR = os.environ.get("LLMFEAT_DATA_DIR") or "../data/local"


def _file(name: str, table: str, description: str) -> FileSource:
    return FileSource(
        name=name,
        path=f"{DATA_DIR}/delta/{table}",
        file_format=DeltaFormat(),
        timestamp_field=TIMESTAMP,
        description=description,
    )


def _spark(name: str, table: str, description: str) -> SparkSource:
    return SparkSource(name=name, table=table, timestamp_field=TIMESTAMP, description=description)


user_bahe_source = _file("user_bahe_source", "feast_user_bahe", "BAHE user vectors, float32.")
behavior_llm_source = _file(
    "behavior_llm_source", "feast_behavior_llm", "Compressed LLM behaviour vectors, float32."
)
item_meta_source = _file("item_meta_source", "feast_item_meta", "Item metadata from the items table.")
user_stats_source = _file("user_stats_source", "feast_user_stats", "Daily cumulative user counters.")
item_stats_source = _file("item_stats_source", "feast_item_stats", "Daily cumulative item counters.")
item_state_source = _file(
    "item_state_source", "item_state", "Fresh item counters, one row per item and event time."
)

# The same tables through the Spark offline store, keyed by the file source they replace.
SPARK_SOURCES = {
    src.name: _spark(
        src.name.replace("_source", "_spark_source"), src.path.rsplit("/", 1)[-1], src.description
    )
    for src in (
        user_bahe_source,
        behavior_llm_source,
        item_meta_source,
        user_stats_source,
        item_stats_source,
        item_state_source,
    )
}


def marc_source(side: str, version: int) -> FileSource:
    """feast_<side>_marc_v<version> (side: user or item): MARC compressor version N's vectors, float32, and
    its SparkSource twin."""
    what = "user snapshots (a time series)" if side == "user" else "item vectors"
    source = _file(
        f"{side}_marc_v{version}_source",
        f"feast_{side}_marc_v{version}",
        f"LLM {what} compressed by MARC compressor version {version}, float32.",
    )
    SPARK_SOURCES[source.name] = _spark(
        f"{side}_marc_v{version}_spark_source", f"feast_{side}_marc_v{version}", source.description
    )
    return source


def user_state_source(representation: str, version: int) -> FileSource:
    """user_state_<representation>_v<version>: the fresh user state over that item representation's vectors
    (spark_jobs/user_state.py), and its SparkSource twin."""
    table = f"user_state_{representation}_v{version}"
    source = _file(
        f"{table}_source",
        table,
        f"Fresh user state over {representation} version {version}: one row per user and event time.",
    )
    SPARK_SOURCES[source.name] = _spark(f"{table}_spark_source", table, source.description)
    return source
