"""Feature services: one per model version, so a model is always served exactly what it was trained on; the
CTR model's MLflow version records the service it consumes (tag feast.feature_service).

Both CTR arms get the same point-in-time ID side: item metadata and the user's and item's impressions and
clicks up to the previous day. The LLM arm adds the MARC user snapshot and item vectors of one compressor
version: the service names that version's views, and never changes them. A new compressor version gets a new
service next to the old one (e.g. `ctr_marc_v3 = ctr_marc("ctr_marc_v3", user_marc_v2_fv, item_marc_v2_fv)`),
which `llmfeat train-ctr --set ctr.llm_feature_service=ctr_marc_v3` trains a model on; models trained on the
old service keep being served the old version's vectors.
"""

from feast import FeatureService, FeatureView
from feature_views import item_marc_v1_fv, item_meta_fv, item_stats_fv, user_marc_v1_fv, user_stats_fv

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
