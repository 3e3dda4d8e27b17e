"""BAHE model and sequences on tiny synthetic data and tiny random-weight configs (no Spark, no weights)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmfeat.models.bahe.data import behavior_sequences, padded_batch
from llmfeat.models.bahe.model import Bahe, BaheConfig, build_bahe, llm_blocks
from llmfeat.models.bahe.train import BaheTrainConfig, fit_bahe, user_vectors
from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.encoder import decoder_blocks

pytestmark = pytest.mark.unit
D = 16
DAY = 86_400 * 1_000_000  # micros


def tiny_llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=D, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaModel(cfg).eval()


def events(rows: list[tuple[str, str, int]]) -> pa.Table:
    """(user_id, behavior_id, day) -> a user_behaviors table."""
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "behavior_id": [r[1] for r in rows],
            "event_timestamp": pa.array([r[2] * DAY for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )


def arrays(rows: list[tuple[int, int, float, str, int]], n_users: int, n_items: int) -> CtrArrays:
    """(user index, item index, label, split, day) -> CtrArrays with no dense features."""
    u, i, y, s, t = (np.array(c) for c in zip(*rows, strict=True))
    return CtrArrays(
        np.array([f"u{k}" for k in range(n_users)], dtype=object),
        np.array([f"i{k}" for k in range(n_items)], dtype=object),
        u.astype(np.int64), i.astype(np.int64), y.astype(np.float32), s.astype(object),
        (t * DAY).astype(np.int64), np.zeros((len(u), 0), np.float32), np.ones(len(u), bool),
    )  # fmt: skip


BEHAVIOR_KEYS = np.array([f"b{k}" for k in range(6)], dtype=object)
VECTORS = np.random.default_rng(0).standard_normal((6, D)).astype(np.float32)


def test_sequences_order_cut_missing_and_no_history() -> None:
    ub = events(
        [("u0", "b2", 3), ("u0", "b1", 1), ("u0", "b0", 1), ("u0", "b5", 9),  # b5 after the cut
         ("u1", "zz", 2), ("u1", "b3", 4), ("u1", "b4", 2)]
    )  # fmt: skip
    seqs = behavior_sequences(ub, BEHAVIOR_KEYS, VECTORS, np.array(["u0", "u1", "u2"], object), cut=8 * DAY)
    assert seqs.lengths.tolist() == [3, 2, 0]
    assert seqs.behavior[seqs.user_events(0)].tolist() == [0, 1, 2]  # time, then behaviour id on ties
    assert seqs.no_history.tolist() == [False, False, True]
    assert (seqs.missing.events, seqs.missing.ids, seqs.missing.users) == (1, 1, 1)
    assert seqs.missing.examples == ("zz",) and "zz" in str(seqs.missing)


def test_prefix_is_strictly_before_row_time_and_capped_at_cut() -> None:
    ub = events([("u0", "b0", 1), ("u0", "b1", 2), ("u0", "b2", 3)])
    seqs = behavior_sequences(ub, BEHAVIOR_KEYS, VECTORS, np.array(["u0"], object), cut=10 * DAY)
    a = arrays(
        [(0, 0, 1, "train", 1), (0, 0, 1, "train", 2), (0, 1, 0, "train", 3), (0, 1, 0, "test", 20)], 1, 2
    )
    # the row at day 2 is the behaviour b1 itself: it must not see it (its rating is the label)
    assert seqs.prefix_lengths(a).tolist() == [0, 1, 2, 3]


def test_max_behaviors_keeps_the_newest() -> None:
    ub = events([("u0", f"b{k}", k) for k in range(5)])
    seqs = behavior_sequences(
        ub, BEHAVIOR_KEYS, VECTORS, np.array(["u0"], object), cut=99 * DAY, max_behaviors=2
    )
    assert seqs.behavior.tolist() == [3, 4]


@pytest.mark.parametrize("deep", ["small", "llm"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_prefix_states_are_causal(deep: str, pooling: str) -> None:
    cfg = BaheConfig(width=D, n_items=3, deep=deep, deep_layers=2, heads=2, pooling=pooling, out_dim=4)  # type: ignore[arg-type]
    model = build_bahe(cfg, tiny_llama() if deep == "llm" else None, split=1).eval()
    x = torch.randn(2, 5, D)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # right padding
    with torch.no_grad():
        before = model.prefix_states(x, mask)
        changed = x.clone()
        changed[:, 3:] = torch.randn(2, 2, D)  # later behaviours (and padding) change
        after = model.prefix_states(changed, mask)
    torch.testing.assert_close(before[:, :3], after[:, :3])


def test_llm_blocks_are_the_layers_above_the_split() -> None:
    base = tiny_llama(layers=4)
    wanted = [p.clone() for p in decoder_blocks(base)[2].parameters()]
    deep = llm_blocks(base, split=2, n=2)
    blocks = decoder_blocks(deep.base)
    assert len(blocks) == 2
    for got, want in zip(blocks[0].parameters(), wanted, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="blocks 4..5"):
        llm_blocks(tiny_llama(layers=4), split=3, n=2)


def test_no_history_gets_the_fallback_vector() -> None:
    model = Bahe(BaheConfig(width=D, n_items=2, heads=2, out_dim=4)).eval()
    prefixes = torch.randn(2, 3, D)
    state = model.pick(prefixes, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]))
    torch.testing.assert_close(state[0], model.fallback)
    torch.testing.assert_close(state[1:], prefixes[1, 1:3])


def synthetic_task(n_users: int = 24) -> tuple[object, CtrArrays]:
    """Users who did b0/b1 click item 0, those who did b2/b3 item 1; the last 4 users have no history."""
    rng = np.random.default_rng(1)
    ub, rows = [], []
    for u in range(n_users):
        taste = u % 2
        if u < n_users - 4:
            for day in range(1, 6):
                ub.append((f"u{u}", f"b{2 * taste + int(rng.integers(0, 2))}", day))
        for day, split in (
            (3, "train"),
            (4, "train"),
            (5, "train"),
            (11, "valid"),
            (12, "valid"),
            (13, "test"),
        ):
            for item in (0, 1):
                rows.append((u, item, float(item == taste), split, day))
    seqs = behavior_sequences(
        events(ub), BEHAVIOR_KEYS, VECTORS, np.array([f"u{u}" for u in range(n_users)], object), cut=10 * DAY
    )
    return seqs, arrays(rows, n_users, 2)


def test_fit_bahe_learns_from_behaviours_and_returns_user_vectors() -> None:
    seqs, a = synthetic_task()
    torch.manual_seed(0)
    model = Bahe(BaheConfig(width=D, n_items=2, heads=2, deep_layers=1, out_dim=4, dropout=0.0))
    fit = fit_bahe(model, seqs, a, BaheTrainConfig(lr=5e-3, users_per_batch=8, max_epochs=15, patience=15))  # type: ignore[arg-type]
    assert fit.history.best_score > 0.9
    vectors = user_vectors(model, seqs)  # type: ignore[arg-type]
    assert vectors.shape == (24, 4) and np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[-1], vectors[-2], atol=1e-6)  # both no-history users: the fallback


def test_padded_batch_right_pads() -> None:
    seqs, _ = synthetic_task()
    x, mask = padded_batch(seqs, np.array([0, 23]))  # type: ignore[arg-type]
    assert x.shape == (2, 5, D) and mask.sum(1).tolist() == [5, 0]
    assert not x[1].any()
