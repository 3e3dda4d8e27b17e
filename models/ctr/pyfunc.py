"""The registered form of a CTR ranker: an MLflow pyfunc holding the weights, the config and the fitted
feature encoder, so that `models:/<name>@champion` scores a scoring frame (models/ctr/features.py) by itself.

    ranker = load_ranker("models:/llmfeat-ctr@champion")   # CtrRanker
    p = ranker.score(frame)                                 # (B,) click probabilities
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from llmfeat.models.ctr.features import VECTOR_COLUMNS, FeatureEncoder
from llmfeat.models.ctr.model import CtrConfig, CtrModel

PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "pandas", "mlflow==3.17.2", "llmfeat==0.1.0"]
ARTIFACTS = ("weights", "config", "encoder")


class CtrRanker(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
    """pyfunc wrapper: scoring frame -> click probabilities."""

    def __init__(self) -> None:
        self.model: CtrModel | None = None
        self.encoder: FeatureEncoder | None = None

    def load_context(self, context: Any) -> None:
        cfg = json.loads(Path(context.artifacts["config"]).read_text())
        cfg["hidden"] = tuple(cfg["hidden"])
        self.attach(
            CtrModel(CtrConfig(**cfg)),
            FeatureEncoder.load(Path(context.artifacts["encoder"])),
            torch.load(context.artifacts["weights"], weights_only=True),
        )

    def attach(self, model: CtrModel, encoder: FeatureEncoder, state: dict[str, Any] | None = None) -> None:
        if state is not None:
            model.load_state_dict(state)
        self.model, self.encoder = model.eval(), encoder

    @property
    def columns(self) -> list[str]:
        """Scoring-frame columns this model reads."""
        assert self.encoder is not None
        extra = ["user_vector", "item_vector"] if self.encoder.uses_llm else []
        return ["user_id", "item_id", "year", "genres", *extra]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        assert self.model is not None and self.encoder is not None, "load_context was not called"
        with torch.no_grad():
            logit = self.model(self.encoder.transform(frame))  # (B,)
        return torch.sigmoid(logit).numpy().astype(np.float64)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        return self.score(model_input)


def write_artifacts(model: CtrModel, encoder: FeatureEncoder, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        name: folder / f"{name}{ext}" for name, ext in zip(ARTIFACTS, (".pt", ".json", ".json"), strict=True)
    }
    torch.save(model.state_dict(), paths["weights"])
    paths["config"].write_text(json.dumps(asdict(model.cfg)))
    encoder.save(paths["encoder"])
    return {k: str(v) for k, v in paths.items()}


def log_ranker(
    model: CtrModel, encoder: FeatureEncoder, example: pd.DataFrame, registered_name: str | None
) -> Any:
    """Inside an active run: log the pyfunc with signature (inferred from the example and its scores), the
    input example and explicit pip requirements; register it when a name is given. Returns ModelInfo."""
    from mlflow.models import infer_signature

    ranker = CtrRanker()
    ranker.attach(model, encoder)
    example = example[ranker.columns].reset_index(drop=True)
    for col in VECTOR_COLUMNS:  # JSON carries float64: the signature says Array(double) to match
        if col in example.columns:
            example[col] = example[col].map(lambda v: [float(x) for x in v])
    signature = infer_signature(example, ranker.score(example))
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name="ctr_model",
            python_model=CtrRanker(),
            artifacts=write_artifacts(model, encoder, Path(tmp)),
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name,
        )


def load_ranker(uri: str) -> CtrRanker:
    """The CtrRanker behind a models:/ or runs:/ URI (no schema enforcement: callers pass scoring frames)."""
    ranker = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(ranker, CtrRanker):
        raise TypeError(f"{uri} is not a CTR ranker (got {type(ranker).__name__})")
    return ranker
