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


def test_branch_sees_cold_flags_and_dense_features() -> None:
    """A cold id (index 0) or other side features must be able to change the branch's logit on their own."""
    cfg = CtrConfig(4, 4, G, F, user_vec_dim=D, item_vec_dim=D, emb_dim=4, hidden=(8,))
    model = CtrModel(cfg).eval()
    assert model.residual is not None
    torch.nn.init.normal_(model.residual.mlp[-1].weight)  # past the zero start
    x = inputs()
    with torch.no_grad():
        base = model.residual(x)
        warm = model.residual(x._replace(user=x.user.clamp(min=1)))  # row 0's user no longer cold
        dense = model.residual(x._replace(dense=x.dense + 1.0))
    assert base[0] != warm[0] and torch.equal(base[1:], warm[1:])  # the same vectors, only the cold flag
    assert not torch.isclose(base, dense).any()


def test_ids_are_dropped_at_the_given_rates_and_cold_rates_count_index_zero() -> None:
    from llmfeat.models.ctr.train import cold_rates, drop_ids

    n = 20_000
    x = inputs()._replace(user=torch.arange(1, n + 1), item=torch.arange(1, n + 1))
    x = x._replace(user=x.user.masked_fill(torch.arange(n) < n // 4, 0))  # a quarter of users cold
    assert cold_rates(x, np.arange(n)) == (0.25, 0.0) and cold_rates(x, np.arange(n // 4)) == (1.0, 0.0)
    dropped = drop_ids(x, (0.86, 0.1), np.random.default_rng(0))
    warm = x.user != 0
    assert (dropped.user[~warm] == 0).all()  # cold ids stay cold
    assert float((dropped.user[warm] == 0).double().mean()) == pytest.approx(0.86, abs=0.01)
    assert float((dropped.item == 0).double().mean()) == pytest.approx(0.1, abs=0.01)
    kept = dropped.user != 0
    assert torch.equal(dropped.user[kept], x.user[kept])  # the rest keep their ids


def test_time_folds_split_valid_by_time_span_so_a_late_burst_is_one_fold() -> None:
    from llmfeat.models.ctr.train import time_folds

    hours = [0, 10, 20, 30, 35, 89, *([90] * 10)]  # a late burst of 10 rows
    frame = pd.DataFrame(
        {"event_timestamp": pd.Timestamp("2001-01-01", tz="UTC") + pd.to_timedelta(hours, "h")}
    )
    rows = np.arange(len(hours))[::-1].copy()  # valid row indices, not in time order
    folds = time_folds(frame, rows, 3)
    spans = [sorted(hours[rows[i]] for i in f) for f in folds]
    assert spans == [[0, 10, 20], [30, 35], [89, *([90] * 10)]]
    assert [len(f) for f in time_folds(pd.DataFrame(index=range(9)), np.arange(9), 3)] == [3, 3, 3]


def cold_valid_frame(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Random labels and noise vectors; valid and test rows draw many users and items unseen in fit."""
    rng = np.random.default_rng(seed)
    late = np.arange(n) >= 400
    f = frame().iloc[np.arange(n) % 4].reset_index(drop=True)
    f = f.assign(
        user_id=[f"u{k}" for k in rng.integers(0, 30, n) + np.where(late, 20, 0)],
        item_id=[f"i{k}" for k in rng.integers(0, 40, n) + np.where(late, 10, 0)],
        user_vector=list(rng.standard_normal((n, D)).astype(np.float32)),
        item_vector=list(rng.standard_normal((n, D)).astype(np.float32)),
        event_timestamp=pd.Timestamp("2001-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), "min"),
        label=(rng.random(n) < 0.5).astype(np.float32),
    )
    masks = {"fit": ~late, "valid": late & (np.arange(n) < 500), "test": np.arange(n) >= 500, "train": ~late}
    return f, masks


def test_branch_trains_on_a_frozen_eval_mode_id_part_with_ids_dropped_at_the_valid_cold_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmfeat.config import CtrConf
    from llmfeat.models.ctr import model as model_module
    from llmfeat.models.ctr.train import fit_model, predict

    f, masks = cold_valid_frame()
    calls: list[tuple[str, bool, float]] = []  # (part, training, share of cold users in the batch)
    deep_forward, residual_forward = model_module.DeepArch.forward, model_module.LlmResidual.forward

    def deep(self: torch.nn.Module, fields: torch.Tensor) -> torch.Tensor:
        calls.append(("deep", self.training, float("nan")))
        return deep_forward(self, fields)  # type: ignore[arg-type]

    def residual(self: torch.nn.Module, x: CtrInputs) -> torch.Tensor:
        calls.append(("residual", self.training, float((x.user == 0).double().mean())))
        return residual_forward(self, x)  # type: ignore[arg-type]

    monkeypatch.setattr(model_module.DeepArch, "forward", deep)
    monkeypatch.setattr(model_module.LlmResidual, "forward", residual)
    logged: dict[str, float] = {}
    cfg = CtrConf(max_epochs=2, batch_size=64)
    ids = f.drop(columns=["user_vector", "item_vector"])
    champion, enc0 = fit_model(ids, masks, False, cfg)
    assert any(part == "deep" and training for part, training, _ in calls)  # the id stage trains with dropout
    calls.clear()
    model, enc = fit_model(
        f, masks, True, cfg, lambda m, step: logged.update(m), id_state=champion.state_dict()
    )
    # every training-mode forward of the branch ran on top of the id part in eval mode
    pairs = list(zip(calls, calls[1:], strict=False))
    trained = [(a, b) for a, b in pairs if b[0] == "residual" and b[1]]
    assert trained and all(a[0] == "deep" and not a[1] for a, b in trained)
    # the dropout rate is the share of valid rows whose user (item) the fit rows never saw
    seen_users, seen_items = set(f.loc[masks["fit"], "user_id"]), set(f.loc[masks["fit"], "item_id"])
    valid = f[masks["valid"]]
    user_rate, item_rate = (
        (~valid["user_id"].isin(seen_users)).mean(),
        (~valid["item_id"].isin(seen_items)).mean(),
    )
    assert 0.3 < user_rate < 0.9 and 0.1 < item_rate
    assert logged["residual_user_id_dropout"] == pytest.approx(user_rate)
    assert logged["residual_item_id_dropout"] == pytest.approx(item_rate)
    # the fit rows know every user: the cold users the branch trained on are the dropped ones
    assert np.mean([share for part, training, share in calls if part == "residual" and training]) == (
        pytest.approx(user_rate, abs=0.05)
    )
    # the id part is the champion's, in eval mode, on the same inputs
    with torch.no_grad():
        torch.testing.assert_close(model.id_logit(enc.transform(f)), champion.id_logit(enc0.transform(ids)))
    # seeded: the same seed gives the same challenger
    again, enc2 = fit_model(f, masks, True, cfg, id_state=champion.state_dict())
    np.testing.assert_array_equal(predict(model, enc, f), predict(again, enc2, f))


def test_selection_keeps_the_zero_branch_when_every_epoch_hurts_valid_logloss() -> None:
    from llmfeat.config import CtrConf
    from llmfeat.models.ctr.train import fit_model

    f, masks = cold_valid_frame(seed=1)  # random labels, noise vectors: nothing for the branch to find
    cfg = CtrConf(max_epochs=2, batch_size=64, residual_lr=1.0, residual_weight_decay=0.0)
    logged: list[tuple[dict[str, float], int]] = []
    model, enc = fit_model(f, masks, True, cfg, lambda m, step: logged.append((m, step)))
    epochs = [m for m, step in logged if step >= 1000]
    assert epochs and all(m["residual_valid_fold_logloss"] > 0.8 for m in epochs)  # a branch that only hurts
    assert model.residual is not None and not model.residual.mlp[-1].weight.any()  # the zero start kept
    with torch.no_grad():
        x = enc.transform(f)
        torch.testing.assert_close(model(x), model.id_logit(x))
