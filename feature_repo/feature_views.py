"""Feature views. Vectors are Array(Float32) of exactly VECTOR_DIM values (checked before materialization).

TTL 0 means a value never expires: a vector or a cumulative counter stays valid until a newer row replaces it.
Lineage columns are served too (the *_lineage_fv views), so a model can log which encoder, layer and
compressor produced the vectors it was fed.
"""

from datetime import timedelta

from data_sources import (
    behavior_llm_source,
    item_llm_source,
    item_meta_source,
    item_stats_source,
    user_llm_source,
    user_stats_source,
)
from entities import behavior, item, user
from feast import FeatureView, Field
from feast.types import Array, Float32, Int64, String

VECTOR_DIM = 64  # the compressor's output dimension d; a table with another length is refused at publish
NO_EXPIRY = timedelta(0)


def _lineage() -> list[Field]:
    return [
        Field(name="source_version", dtype=Int64, description="Delta version of the representation table"),
        Field(name="encoder_id", dtype=String, description="LLM the states came from"),
        Field(name="layer", dtype=Int64, description="tapped layer of that LLM"),
        Field(name="compressor_name", dtype=String, description="registered compressor"),
        Field(name="compressor_version", dtype=String, description="its registry version"),
        Field(name="dtype", dtype=String, description="storage dtype in Delta (float16 or int8)"),
    ]


def _vector(name: str, what: str) -> Field:
    return Field(
        name=name,
        dtype=Array(Float32),
        vector_length=VECTOR_DIM,
        description=f"MARC-compressed LLM {what} vector, {VECTOR_DIM} x float32 (decoded from float16/int8)",
    )


user_llm_fv = FeatureView(
    name="user_llm_fv",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=[_vector("user_vector", "user")],
    source=user_llm_source,
    online=True,
    description="Compressed mid-layer LLM representation of each user.",
    tags={"kind": "llm_vector", "dim": str(VECTOR_DIM)},
)

item_llm_fv = FeatureView(
    name="item_llm_fv",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[_vector("item_vector", "item")],
    source=item_llm_source,
    online=True,
    description="Compressed mid-layer LLM representation of each item.",
    tags={"kind": "llm_vector", "dim": str(VECTOR_DIM)},
)

behavior_llm_fv = FeatureView(
    name="behavior_llm_fv",
    entities=[behavior],
    ttl=NO_EXPIRY,
    schema=[_vector("behavior_vector", "behaviour")],
    source=behavior_llm_source,
    online=True,
    description="Compressed shallow-layer LLM representation of each atomic behaviour (BAHE).",
    tags={"kind": "llm_vector", "dim": str(VECTOR_DIM)},
)

# Lineage in views of their own on the same tables: the online stores read every feature of a view per key, so
# keeping the vector views to one field makes the ranking-request read one row per key instead of seven.
user_llm_lineage_fv = FeatureView(
    name="user_llm_lineage_fv",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=_lineage(),
    source=user_llm_source,
    description="Where each user vector came from.",
    tags={"kind": "lineage"},
)

item_llm_lineage_fv = FeatureView(
    name="item_llm_lineage_fv",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=_lineage(),
    source=item_llm_source,
    description="Where each item vector came from.",
    tags={"kind": "lineage"},
)

behavior_llm_lineage_fv = FeatureView(
    name="behavior_llm_lineage_fv",
    entities=[behavior],
    ttl=NO_EXPIRY,
    schema=_lineage(),
    source=behavior_llm_source,
    description="Where each behaviour vector came from.",
    tags={"kind": "lineage"},
)

item_meta_fv = FeatureView(
    name="item_meta_fv",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="title", dtype=String),
        Field(name="year", dtype=Int64, description="release year; null when unknown"),
        Field(name="genres", dtype=String, description='"A|B"'),
    ],
    source=item_meta_source,
    online=True,
    description="Static item metadata, valid from the epoch.",
    tags={"kind": "metadata"},
)

user_stats_fv = FeatureView(
    name="user_stats_fv",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="user_impressions", dtype=Int64, description="interactions before the row's day"),
        Field(name="user_clicks", dtype=Int64, description="positive labels before the row's day"),
    ],
    source=user_stats_source,
    online=True,
    description="Cumulative user counters, one row per active day, stamped at the start of the next day.",
    tags={"kind": "counter"},
)

item_stats_fv = FeatureView(
    name="item_stats_fv",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="item_impressions", dtype=Int64, description="interactions before the row's day"),
        Field(name="item_clicks", dtype=Int64, description="positive labels before the row's day"),
    ],
    source=item_stats_source,
    online=True,
    description="Cumulative item counters, one row per active day, stamped at the start of the next day.",
    tags={"kind": "counter"},
)
