"""CTR model parts and the feature encoder on tiny tensors (no services)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrConfig, CtrInputs, CtrModel, FmArch

pytestmark = pytest.mark.unit
B, G, F, D = 5, 3, 9, 8


def inputs(du: int = D, di: int = D) -> CtrInputs:
    g = torch.Generator().manual_seed(0)
    return CtrInputs(
        user=torch.tensor([0, 1, 2, 3, 1]),
        item=torch.tensor([1, 0, 2, 2, 3]),
        genres=(torch.rand(B, G, generator=g) > 0.5).float(),
        dense=torch.randn(B, F, generator=g),
        user_vec=torch.randn(B, du, generator=g),
        item_vec=torch.randn(B, di, generator=g),
    )


@pytest.mark.parametrize("kind", ["dnn", "deepfm"])
@pytest.mark.parametrize("dim", [0, D])
def test_model_gives_one_logit_per_row_with_and_without_llm(kind: str, dim: int) -> None:
    cfg = CtrConfig(4, 4, G, F, user_vec_dim=dim, item_vec_dim=dim, kind=kind, emb_dim=4, hidden=(8,))  # type: ignore[arg-type]
    model = CtrModel(cfg).eval()
    out = model(inputs(dim, dim))
    assert out.shape == (B,) and torch.isfinite(out).all()
    assert (model.llm is not None) == bool(dim) and (model.fm is not None) == (kind == "deepfm")
    out.sum().backward()  # every part is trainable end to end


def test_fm_term_is_the_sum_over_field_pairs() -> None:
    fields = torch.randn(2, 4, 3)  # (B, K, E)
    pairs = sum((fields[:, a] * fields[:, b]).sum(-1) for a in range(4) for b in range(a + 1, 4))
    torch.testing.assert_close(FmArch()(fields), pairs)


def frame() -> pd.DataFrame:
    vec = [np.arange(D, dtype=np.float32) + k for k in range(4)]
    return pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "c"],
            "item_id": ["x", "y", "x", "z"],
            "year": [1995.0, np.nan, 1995.0, 2000.0],
            "genres": ["Action|Drama", None, "Action", "Comedy"],
            "user_vector": [vec[0], vec[0], None, vec[3]],
            "item_vector": [vec[1], vec[2], vec[1], vec[3]],
        }
    )


def test_encoder_maps_unknown_ids_to_zero_and_flags_missing_vectors(tmp_path: Path) -> None:
    f = frame()
    labels = np.array([1, 0, 1, 0], dtype=np.float32)
    fit = np.array([True, True, True, False])
    enc = FeatureEncoder.fit(f, labels, fit, fit, use_llm=True)
    x = enc.transform(f)
    assert x.user.tolist() == [1, 1, 2, 0] and x.item.tolist() == [1, 2, 1, 0]  # c and z unseen: index 0
    assert x.genres.shape == (4, 3) and x.genres[0].tolist() == [1.0, 0.0, 1.0]  # Action, Comedy, Drama
    assert x.dense.shape == (4, len(enc.dense_names)) and x.user_vec.shape == (4, D)
    missing = enc.dense_names.index("user_vector_missing")
    assert x.dense[:, missing].tolist() == [0.0, 0.0, 1.0, 0.0] and not x.user_vec[2].any()
    enc.save(tmp_path / "enc.json")
    again = FeatureEncoder.load(tmp_path / "enc.json").transform(f)
    for a, b in zip(x, again, strict=True):
        torch.testing.assert_close(a, b)


def test_encoder_without_llm_ignores_vectors() -> None:
    f = frame().drop(columns=["user_vector", "item_vector"])
    enc = FeatureEncoder.fit(f, np.ones(4, np.float32), np.ones(4, bool), np.ones(4, bool), use_llm=False)
    x = enc.transform(f)
    assert x.user_vec.shape == (4, 0) and "user_vector_missing" not in enc.dense_names
