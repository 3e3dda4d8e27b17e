"""Feature services: one per model version, so a model is always served exactly what it was trained on."""

from feast import FeatureService
from feature_views import item_llm_fv, item_meta_fv, item_stats_fv, user_llm_fv, user_stats_fv

ctr_marc_v1 = FeatureService(
    name="ctr_marc_v1",
    features=[user_llm_fv[["user_vector"]], item_llm_fv[["item_vector"]]],
    description="CTR ranker on MARC-compressed user and item vectors (the ranking-request fetch).",
    tags={"model": "ctr", "compressor": "marc"},
)

ctr_marc_counters_v1 = FeatureService(
    name="ctr_marc_counters_v1",
    features=[
        user_llm_fv[["user_vector"]],
        item_llm_fv[["item_vector"]],
        item_meta_fv[["year"]],
        user_stats_fv,
        item_stats_fv,
    ],
    description="CTR ranker on the vectors, item year and the cumulative counters.",
    tags={"model": "ctr", "compressor": "marc"},
)

# The CTR rankers of models/ctr/model.py: the same model with and without the LLM vectors
# (spark_jobs/train_ctr.py).
ctr_llm_v1 = FeatureService(
    name="ctr_llm_v1",
    features=[user_llm_fv[["user_vector"]], item_llm_fv[["item_vector"]], item_meta_fv[["year", "genres"]]],
    description="CTR ranker (DNN, DeepFM) on user and item LLM vectors and item metadata; ids in the model.",
    tags={"model": "ctr", "llm": "true"},
)

ctr_id_v1 = FeatureService(
    name="ctr_id_v1",
    features=[item_meta_fv[["year", "genres"]]],
    description="The same CTR ranker without the LLM vectors: ids (in the model) and item metadata only.",
    tags={"model": "ctr", "llm": "false"},
)
