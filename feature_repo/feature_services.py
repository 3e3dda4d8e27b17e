"""Feature services: one per model version, so a model is always served exactly what it was trained on; the
CTR model's MLflow version records the service it consumes (tag feast.feature_service).

Both CTR arms get the same point-in-time ID side: item metadata and the user's and item's impressions and
clicks up to the previous day. The LLM arm adds the MARC user snapshot and item vectors of one compressor
version: the service names that version's views, and never changes them. A new compressor version gets a new
service next to the old one (e.g. `ctr_marc_v3 = ctr_marc("ctr_marc_v3", user_marc_v2_fv, item_marc_v2_fv)`),
which `llmfeat train-ctr --set ctr.llm_feature_service=ctr_marc_v3` trains a model on; models trained on the
old service keep being served the old version's vectors.

The fresh services (`ctr_fresh`) add what every event changes: the item's impressions and clicks and the
user's state (counts, like rate, the mean vectors of the liked and the disliked items) as of the newest
earlier event, over one compressor version's item vectors, with those item vectors; the ranker computes each
candidate's cosine with the two means itself.
"""

from feast import FeatureService, FeatureView
from feature_views import (
    item_marc_v1_fv,
    item_meta_fv,
    item_state_fv,
    item_stats_fv,
    user_marc_v1_fv,
    user_state_item_marc_v1_fv,
    user_stats_fv,
)

ID_SIDE = [item_meta_fv[["year", "genres"]], user_stats_fv, item_stats_fv]


def ctr_marc(name: str, user_marc: FeatureView, item_marc: FeatureView) -> FeatureService:
    """The id side plus one MARC compressor version's user snapshot and item vectors."""
    version = user_marc.tags["compressor_version"]
    return FeatureService(
        name=name,
        features=[*ID_SIDE, user_marc[["user_vector"]], item_marc[["item_vector"]]],
        description=(
            f"The id ranker plus the MARC user snapshot and item vectors of {user_marc.name} and "
            f"{item_marc.name} (a residual branch on the ids)."
        ),
        tags={"model": "ctr", "llm": "true", "compressor": "marc", "compressor_version": version},
    )


ctr_id_v2 = FeatureService(
    name="ctr_id_v2",
    features=ID_SIDE,
    description="CTR ranker without LLM features: ids (in the model), item metadata, point-in-time counters.",
    tags={"model": "ctr", "llm": "false"},
)
ctr_marc_v2 = ctr_marc("ctr_marc_v2", user_marc_v1_fv, item_marc_v1_fv)


FRESH_USER = ["event_count", "like_rate", "liked_mean", "disliked_mean"]


def ctr_fresh(name: str, user_state: FeatureView, item_marc: FeatureView) -> FeatureService:
    """The id side, the fresh item counters and user state, and the item vectors the state is built on."""
    version = item_marc.tags["compressor_version"]
    if user_state.tags["representation_version"] != version:
        raise ValueError(f"{user_state.name} is not over {item_marc.name}'s vectors")
    return FeatureService(
        name=name,
        features=[*ID_SIDE, item_state_fv, user_state[FRESH_USER], item_marc[["item_vector"]]],
        description=(
            f"The id ranker with fresh counters and the user state over {item_marc.name}: counts, like rate, "
            "mean vectors of liked and disliked items (cosines with the candidate computed at ranking)."
        ),
        tags={"model": "ctr", "llm": "true", "fresh": "true", "compressor_version": version},
    )


ctr_fresh_id_v1 = FeatureService(
    name="ctr_fresh_id_v1",
    features=[*ID_SIDE, item_state_fv, user_state_item_marc_v1_fv[["event_count", "like_rate"]]],
    description="The id ranker with fresh counters only (no LLM vectors): the fresh arms' reference.",
    tags={"model": "ctr", "llm": "false", "fresh": "true"},
)
ctr_fresh_marc_v1 = ctr_fresh("ctr_fresh_marc_v1", user_state_item_marc_v1_fv, item_marc_v1_fv)

ctr_content_v1 = FeatureService(
    name="ctr_content_v1",
    features=[item_meta_fv[["year", "genres"]]],
    description=(
        "Item content only (year, genres), no counters: what the replay's deliberately weakened ranker reads "
        "(trained with every id hidden), a comparison whose answer is known."
    ),
    tags={"model": "ctr", "llm": "false"},
)
