"""The ranking service's scoring path: the ranker's array entry point gives what its DataFrame path gives, on
columns as the online read returns them (nulls, unknown ids, a user vector repeated per candidate)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llmfeat.config import CtrConf
from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrModel
from llmfeat.models.ctr.pyfunc import CtrRanker
from llmfeat.models.ctr.train import model_config
from llmfeat.serving.arms import Scorer, as_frame

pytestmark = pytest.mark.unit
DIM = 8


def training_frame(rng: np.random.Generator, n: int = 400) -> pd.DataFrame:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, 30, n).astype(str),
            "item_id": rng.integers(1, 50, n).astype(str),
            "year": np.where(rng.random(n) < 0.1, np.nan, rng.integers(1950, 2000, n)),
            "genres": rng.choice(["Action", "Comedy|Drama", None], n),
            "user_impressions": rng.integers(0, 40, n),
            "user_clicks": rng.integers(0, 20, n),
            "item_impressions": rng.integers(0, 90, n),
            "item_clicks": rng.integers(0, 30, n),
            "user_vector": list(vectors),
            "item_vector": list(rng.normal(size=(n, DIM)).astype(np.float32)),
        }
    )


def request_columns(rng: np.random.Generator, n: int = 12) -> dict:
    """1 user x n items as ServiceFeatures.fetch returns them: NaN for nulls, NaN rows for missing vectors."""
    items = rng.normal(size=(n, DIM)).astype(np.float32)
    items[[2, 5]] = np.nan
    user = rng.normal(size=DIM).astype(np.float32)
    counts = rng.integers(0, 50, n).astype(np.float64)
    counts[3] = np.nan
    genres = np.empty(n, dtype=object)
    genres[:] = [["Action", "Comedy|Drama", None, "Unseen|Action"][k % 4] for k in range(n)]
    return {
        "user_id": ["7"] * n,
        "item_id": [str(i) for i in range(40, 40 + n)],  # some seen in training, some not
        "year": np.where(np.arange(n) % 4 == 0, np.nan, 1990.0),
        "genres": genres,
        "user_impressions": np.full(n, 12.0),
        "user_clicks": np.full(n, np.nan),
        "item_impressions": counts,
        "item_clicks": counts / 2,
        "user_vector": np.broadcast_to(user, (n, DIM)),
        "item_vector": items,
    }


@pytest.mark.parametrize("use_llm", [False, True])
def test_array_path_scores_what_the_frame_path_scores(use_llm: bool) -> None:
    rng = np.random.default_rng(0)
    frame = training_frame(rng)
    fit = np.arange(len(frame)) < 300
    encoder = FeatureEncoder.fit(frame, rng.integers(0, 2, len(frame)), fit, fit, use_llm)
    torch.manual_seed(0)
    model = CtrModel(model_config(CtrConf(emb_dim=4, hidden=[8]), encoder))
    with torch.no_grad():  # non-zero everywhere, the zero-initialised residual layer too
        for p in model.parameters():
            p.normal_(0, 0.3)
    ranker = CtrRanker()
    ranker.attach(model, encoder)
    columns = request_columns(rng)
    fast = ranker.score_arrays(columns)
    assert fast.shape == (12,) and np.all((fast > 0) & (fast < 1))
    np.testing.assert_allclose(fast, ranker.score(as_frame(columns)), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(fast, 6))) > 6  # the inputs matter: not one constant score
    assert Scorer(ranker, columns).fast


def test_a_ranker_without_the_array_path_is_scored_through_its_frame() -> None:
    class FrameOnly:
        def score(self, frame: pd.DataFrame) -> np.ndarray:
            assert frame["user_vector"].iloc[0] is None and frame["item_id"].tolist() == ["1", "2"]
            return np.array([0.25, 0.75])

    scorer = Scorer(FrameOnly(), None)  # type: ignore[arg-type]
    columns = {"user_id": ["u", "u"], "item_id": ["1", "2"], "user_vector": np.full((2, DIM), np.nan)}
    assert not scorer.fast and scorer(columns).tolist() == [0.25, 0.75]
