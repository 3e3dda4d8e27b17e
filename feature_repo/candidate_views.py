"""Next-item candidates: each user's top-K items from the Lite-LLM4Rec model (`llmfeat train-lite` with
lite.publish_k > 0 writes the user_candidates Delta table), served per user to the ranking service."""

from datetime import timedelta

from data_sources import SPARK_SOURCES, TIMESTAMP, _file, _spark
from entities import user
from feast import FeatureView, Field
from feast.types import Array, Float32, Int64, String

user_candidates_source = _file(
    "user_candidates_source", "user_candidates", "Top-K next-item candidates per user (Lite-LLM4Rec)."
)
SPARK_SOURCES[user_candidates_source.name] = _spark(
    "user_candidates_spark_source", "user_candidates", user_candidates_source.description
)

user_candidates_fv = FeatureView(
    name="user_candidates_fv",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="candidate_items", dtype=Array(String), description="item ids, best first"),
        Field(name="candidate_scores", dtype=Array(Float32), description="the model's logits, same order"),
        Field(name="model", dtype=String, description="model that produced the candidates"),
        Field(name="run_id", dtype=String, description="MLflow run of that model"),
        Field(name="encoder_id", dtype=String, description="LLM of the item vectors"),
        Field(name="item_layer", dtype=Int64, description="its layer"),
    ],
    source=user_candidates_source,
    online=True,
    description=f"Next-item candidates per user for candidate generation (timestamp column {TIMESTAMP}).",
    tags={"kind": "candidates", "model": "lite_llm4rec"},
)
