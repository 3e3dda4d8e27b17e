"""Feature services: one per model version, so a model is always served exactly what it was trained on; the
CTR model's MLflow version records the service it consumes (tag feast.feature_service).

Both CTR arms get the same point-in-time ID side: item metadata and the user's and item's impressions and
clicks up to the previous day. The LLM arm adds the MARC user snapshot and item vectors.
"""

from feast import FeatureService
from feature_views import item_marc_fv, item_meta_fv, item_stats_fv, user_marc_fv, user_stats_fv

ctr_id_v2 = FeatureService(
    name="ctr_id_v2",
    features=[item_meta_fv[["year", "genres"]], user_stats_fv, item_stats_fv],
    description="CTR ranker without LLM features: ids (in the model), item metadata, point-in-time counters.",
    tags={"model": "ctr", "llm": "false"},
)
ctr_marc_v2 = FeatureService(
    name="ctr_marc_v2",
    features=[
        item_meta_fv[["year", "genres"]],
        user_stats_fv,
        item_stats_fv,
        user_marc_fv[["user_vector"]],
        item_marc_fv[["item_vector"]],
    ],
    description="The same ranker plus MARC user snapshot and item vectors (a residual branch on the ids).",
    tags={"model": "ctr", "llm": "true", "compressor": "marc"},
)
