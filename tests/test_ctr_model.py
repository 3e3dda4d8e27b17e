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
B, G, F, D = 5, 3, 7, 8


def inputs(du: int = D, di: int = D) -> CtrInputs:
    g = torch.Generator().manual_seed(0)
    return CtrInputs(
        user=torch.tensor([0, 1, 2, 3, 1]),
        item=torch.tensor([1, 0, 2, 2, 3]),
        genres=(torch.rand(B, G, generator=g) > 0.5).float(),
        dense=torch.randn(B, F, generator=g),
        user_vec=torch.randn(B, du, generator=g),
        item_vec=torch.randn(B, di, generator=g),
        vec_missing=torch.zeros(B, 2),
    )


@pytest.mark.parametrize("kind", ["dnn", "deepfm"])
@pytest.mark.parametrize("dim", [0, D])
def test_model_gives_one_logit_per_row_with_and_without_llm(kind: str, dim: int) -> None:
    cfg = CtrConfig(4, 4, G, F, user_vec_dim=dim, item_vec_dim=dim, kind=kind, emb_dim=4, hidden=(8,))  # type: ignore[arg-type]
    model = CtrModel(cfg).eval()
    out = model(inputs(dim, dim))
    assert out.shape == (B,) and torch.isfinite(out).all()
    assert (model.residual is not None) == bool(dim) and (model.fm is not None) == (kind == "deepfm")
    # the residual branch starts at zero: with vectors, the model starts as the id model
    torch.testing.assert_close(out, model.id_logit(inputs(dim, dim)))
    out.sum().backward()  # every part is trainable end to end
    if dim:
        assert model.residual is not None and model.residual.mlp[-1].weight.grad is not None


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
            "user_impressions": [np.nan, 3, 1, np.nan],
            "user_clicks": [np.nan, 2, 0, np.nan],
            "item_impressions": [5, np.nan, 5, 1],
            "item_clicks": [4, np.nan, 4, 0],
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
    assert x.vec_missing[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0] and not x.user_vec[2].any()
    history = enc.dense_names.index("user_has_history")  # from the point-in-time counters
    assert x.dense[:, history].tolist() == [0.0, 1.0, 1.0, 0.0]
    enc.save(tmp_path / "enc.json")
    again = FeatureEncoder.load(tmp_path / "enc.json").transform(f)
    for a, b in zip(x, again, strict=True):
        torch.testing.assert_close(a, b)


def test_encoder_without_llm_ignores_vectors() -> None:
    f = frame().drop(columns=["user_vector", "item_vector"])
    enc = FeatureEncoder.fit(f, np.ones(4, np.float32), np.ones(4, bool), np.ones(4, bool), use_llm=False)
    x = enc.transform(f)
    assert x.user_vec.shape == (4, 0) and not enc.uses_llm


def test_history_means_use_earlier_days_only() -> None:
    from llmfeat.models.ctr.history import history_means

    vectors = np.eye(3, dtype=np.float32)  # item i -> e_i
    users = np.array([0, 0, 0, 1])
    items = np.array([0, 1, 2, 2])
    days = np.array([1, 1, 2, 1])
    labels = np.array([1, 0, 1, 1])
    out = history_means(users, items, days, labels, vectors)  # (4, 6)
    assert (out[:2] == 0).all() and (out[3] == 0).all()  # first day: no history, even for same-day rows
    np.testing.assert_array_equal(out[2], [1, 0, 0, 0, 1, 0])  # liked item 0, disliked item 1, day before


def test_same_seed_gives_the_same_id_part_with_and_without_llm_fields() -> None:
    """The challenger is the champion's id model plus a branch: its id part must not differ by chance."""
    from llmfeat.config import CtrConf
    from llmfeat.models.ctr.train import fit_model

    rng = np.random.default_rng(0)
    n = 600
    base = frame().iloc[np.arange(n) % 4].reset_index(drop=True)
    f = base.assign(
        user_id=[f"u{k}" for k in rng.integers(0, 30, n)],
        item_id=[f"i{k}" for k in rng.integers(0, 40, n)],
        user_vector=list(rng.standard_normal((n, D)).astype(np.float32)),
        item_vector=list(rng.standard_normal((n, D)).astype(np.float32)),
    )
    y = rng.random(n) < 0.5
    f["label"] = y.astype(np.float32)
    masks = {"fit": np.arange(n) < 400, "valid": (np.arange(n) >= 400) & (np.arange(n) < 500)}
    masks |= {"test": np.arange(n) >= 500, "train": np.arange(n) < 400}
    cfg = CtrConf(max_epochs=2, batch_size=64)
    ids = f.drop(columns=["user_vector", "item_vector"])
    champion, enc0 = fit_model(ids, masks, False, cfg)
    challenger, enc1 = fit_model(f, masks, True, cfg)
    with torch.no_grad():
        a = champion.id_logit(enc0.transform(ids))
        b = challenger.id_logit(enc1.transform(f))
    torch.testing.assert_close(a, b)
