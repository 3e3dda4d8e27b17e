"""Feature views: one per representation (MARC users, MARC items, BAHE users, behaviours), never mixed: the
publish step refuses a table holding two encoders, layers or compressor versions. Vectors are Array(Float32)
of exactly VECTOR_DIM values (checked before materialization).

MARC views are versioned by their compressor: user_marc_v<N>_fv and item_marc_v<N>_fv serve what version N of
the registered compressor (<marc.registry_name>-users / -items) made of the whole history. A new version is
published next to the old ones: add its two lines below (and a feature service naming its views) and run
`llmfeat compress` and `llmfeat features`; an older version's lines stay while a model's feature service pins
them, and its vectors keep being materialized and served. (Separate views rather than Feast's
FeatureView(version=...): Feast keeps one active version per view name, so an old one could not stay served.)
The BAHE views' `version` tag is bumped when what they mean changes.

Fresh state views (spark_jobs/user_state.py): user_state_item_marc_v<N>_fv holds, per user, the state of every
event up to a time (counts, smoothed like rate, the mean item vector of the liked and of the disliked items,
over compressor version N's item vectors), stamped 1 microsecond after that time; item_state_fv the items'
fresh impressions and clicks. Online they are written by the event path (POST /events, `llmfeat push`) and
by materialization, never older over newer (serving/state_store.py); a new item-vector version gets its own
user view, so no online state mixes two versions.

TTL 0 means a value never expires: a vector or a cumulative counter stays valid until a newer row replaces it.
Lineage columns are served too (the *_lineage_fv views), so a model can log which encoder, layer and
compressor produced the vectors it was fed.
"""

from datetime import timedelta

from data_sources import (
    behavior_llm_source,
    item_meta_source,
    item_state_source,
    item_stats_source,
    marc_source,
    user_bahe_source,
    user_state_source,
    user_stats_source,
)
from entities import behavior, item, user
from feast import FeatureView, Field
from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp

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
        description=f"{what} vector, {VECTOR_DIM} x float32 (decoded from float16/int8)",
    )


def _times(*names: str) -> list[Field]:
    what = {
        "valid_from": "from when the vector may be used (its event_timestamp)",
        "history_until": "newest behaviour the user text holds (null: demographics only)",
    }
    return [Field(name=n, dtype=UnixTimestamp, description=what[n.split("_", 1)[1]]) for n in names]


def _vectors(  # type: ignore[no-untyped-def]
    name: str, entity, source, field: str, what: str, tags: dict[str, str], times: list[Field]
) -> list[FeatureView]:
    """A representation's vector view and its lineage twin (the online stores read every feature of a view per
    key, so the vector view keeps to one field: one row per key on the ranking-request read)."""
    vector = FeatureView(
        name=name,
        entities=[entity],
        ttl=NO_EXPIRY,
        schema=[_vector(field, what)],
        source=source,
        online=True,
        description=what,
        tags={"kind": "llm_vector", "dim": str(VECTOR_DIM), **tags},
    )
    lineage = FeatureView(
        name=name.removesuffix("_fv") + "_lineage_fv",
        entities=[entity],
        ttl=NO_EXPIRY,
        schema=_lineage() + times,
        source=source,
        description=f"Where each vector of {name} came from, and when it became valid.",
        tags={"kind": "lineage"},
    )
    return [vector, lineage]


def user_marc_views(version: int) -> list[FeatureView]:
    """user_marc_v<N>_fv and its lineage twin: the user snapshots of MARC compressor version N."""
    return _vectors(
        f"user_marc_v{version}_fv",
        user,
        marc_source("user", version),
        "user_vector",
        "MARC-compressed LLM user snapshot: valid from its time, its text holds only earlier behaviour",
        {"representation": "marc", "compressor_version": str(version)},
        _times("user_valid_from", "user_history_until"),
    )


def item_marc_views(version: int) -> list[FeatureView]:
    """item_marc_v<N>_fv and its lineage twin: the item vectors of MARC compressor version N."""
    return _vectors(
        f"item_marc_v{version}_fv",
        item,
        marc_source("item", version),
        "item_vector",
        "MARC-compressed LLM item vector, valid from the item's first availability",
        {"representation": "marc", "compressor_version": str(version)},
        _times("item_valid_from"),
    )


# One pair of lines per published MARC compressor version (its registry version, the same for the user and the
# item compressor that one `llmfeat train-compressor` registers).
user_marc_v1_fv, user_marc_v1_lineage_fv = user_marc_views(1)
item_marc_v1_fv, item_marc_v1_lineage_fv = item_marc_views(1)

user_bahe_fv, user_bahe_lineage_fv = _vectors(
    "user_bahe_fv",
    user,
    user_bahe_source,
    "user_vector",
    "BAHE user vector (shallow-layer behaviour table, trained deep layers)",
    {"representation": "bahe", "version": "1"},
    [],
)
behavior_llm_fv, behavior_llm_lineage_fv = _vectors(
    "behavior_llm_fv",
    behavior,
    behavior_llm_source,
    "behavior_vector",
    "Compressed shallow-layer LLM representation of each atomic behaviour (BAHE)",
    {"representation": "bahe-behavior", "version": "1"},
    [],
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


def _state_vector(name: str, what: str) -> Field:
    return Field(name=name, dtype=Array(Float32), vector_length=VECTOR_DIM, description=what)


def user_state_view(version: int) -> FeatureView:
    """user_state_item_marc_v<N>_fv: the fresh user state over MARC compressor version N's item vectors."""
    recency = "weighted by recency (state.half_life_s; the plain mean when 0)"
    return FeatureView(
        name=f"user_state_item_marc_v{version}_fv",
        entities=[user],
        ttl=NO_EXPIRY,
        schema=[
            Field(name="event_count", dtype=Int64, description="events up to the row's time"),
            Field(name="liked_count", dtype=Int64, description="of which liked (label 1)"),
            Field(name="disliked_count", dtype=Int64, description="of which disliked (label 0)"),
            Field(name="like_rate", dtype=Float64, description="liked share, smoothed to the fit period's"),
            _state_vector("liked_mean", "mean item vector of the liked items"),
            _state_vector("disliked_mean", "mean item vector of the disliked items"),
            _state_vector("liked_recent_mean", f"liked_mean {recency}"),
            _state_vector("disliked_recent_mean", f"disliked_mean {recency}"),
            Field(name="liked_recent_weight", dtype=Float64, description="weight of liked_recent_mean"),
            Field(name="disliked_recent_weight", dtype=Float64, description="weight of disliked_recent_mean"),
            Field(name="newest_event_us", dtype=Int64, description="newest event held, epoch microseconds"),
            Field(name="representation", dtype=String, description="item representation of the means"),
            Field(name="representation_version", dtype=String, description="its compressor version"),
            Field(name="layer", dtype=Int64, description="the tapped layer of its vectors"),
        ],
        source=user_state_source("item_marc", version),
        online=True,
        description="Fresh user state: every event strictly before the row, over item_marc_v"
        f"{version}'s vectors",
        tags={"kind": "state", "representation": "item_marc", "representation_version": str(version)},
    )


# One line per item-vector version a model reads its users' fresh state over.
user_state_item_marc_v1_fv = user_state_view(1)

item_state_fv = FeatureView(
    name="item_state_fv",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="item_event_count", dtype=Int64, description="impressions up to the row's time"),
        Field(name="item_liked_count", dtype=Int64, description="clicks (label 1) up to the row's time"),
        Field(name="item_newest_event_us", dtype=Int64, description="newest event held, epoch microseconds"),
    ],
    source=item_state_source,
    online=True,
    description="Fresh item counters: every event strictly before the row.",
    tags={"kind": "state"},
)
