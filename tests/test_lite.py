"""Lite-LLM4Rec, SASRec and popularity on a tiny synthetic lake: data, metrics, training, MLflow, publish."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmfeat.config import Settings, load_settings
from llmfeat.models.evaluation.rank_metrics import (
    ItemSets,
    ndcg_at,
    paired_difference,
    rank_queries,
    recall_at,
    target_ranks,
    user_bootstrap_interval,
)
from llmfeat.models.lite_llm4rec.data import EventLog, eval_queries, event_log, train_windows, user_histories
from llmfeat.models.lite_llm4rec.model import LiteLLM4Rec
from llmfeat.models.lite_llm4rec.sasrec import SASRec, SeqConfig

pytestmark = pytest.mark.unit
N_ITEMS, N_USERS, STEPS = 40, 24, 10


def tiny_lake(root: Path, hidden: int = 8) -> None:
    """Users walk the items in a cycle (user u starts at item u % I): the next item is predictable."""
    from deltalake import write_deltalake

    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    rows = [
        (str(u), str((u + s) % N_ITEMS + 1), t0 + timedelta(hours=s * N_USERS + u))
        for s in range(STEPS)
        for u in range(N_USERS)
    ]
    n = len(rows)
    split = ["train"] * int(n * 0.8) + ["valid"] * int(n * 0.1)
    split += ["test"] * (n - len(split))
    interactions = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "rating": [4.0] * n,
            "label": [1] * n,
            "event_timestamp": pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC")),
            "split": split,
        }
    )
    items = pa.table({"item_id": [str(i) for i in range(1, N_ITEMS + 1)]})
    rng = np.random.default_rng(0)
    keys = [str(i) for i in range(1, N_ITEMS + 1)]
    vec = rng.normal(size=(N_ITEMS, hidden)).astype(np.float32)
    repr_ = pa.table(
        {
            "item_id": keys,
            "layer": [2] * N_ITEMS,
            "vector": pa.array(vec.tolist(), pa.list_(pa.float32())),
            "encoder_id": ["tiny"] * N_ITEMS,
            "weights_hash": ["abc"] * N_ITEMS,
            "pooling": ["mean+l2"] * N_ITEMS,
        }
    )
    for name, table in (("interactions", interactions), ("items", items), ("items_repr", repr_)):
        write_deltalake(str(root / "delta" / name), table)


@pytest.fixture
def lite_settings(tmp_path: Path) -> Settings:
    tiny_lake(tmp_path / "lake")
    return load_settings(
        "tiny",
        [
            f"data_dir={tmp_path / 'lake'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "lite.layer=2",
            "lite.max_seq=6",
            "lite.dim=16",
            "lite.blocks=1",
            "lite.dropout=0.0",
            "lite.lr=0.01",
            "lite.max_epochs=12",
            "lite.patience=12",
            "lite.batch_size=32",
            "lite.seeds=[0,1]",
            "lite.k=3",
        ],
    )


def test_target_ranks_excludes_history_and_padding() -> None:
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0]])  # index 0 (padding) scores highest: ignored
    history = torch.tensor([[0, 2]])  # item 2 seen: excluded
    assert target_ranks(scores, history, torch.tensor([3])).item() == 1.0  # only item 4 beats item 3
    assert target_ranks(scores, history, torch.tensor([4])).item() == 0.0
    ranks = np.array([0.0, 1.0, 5.0])
    assert recall_at(ranks, 2).tolist() == [1.0, 1.0, 0.0]
    assert ndcg_at(ranks, 2)[1] == pytest.approx(1 / np.log2(3))


def test_target_ranks_takes_a_mask_of_excluded_items() -> None:
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0]])
    seen = torch.tensor([[False, False, True, False, True]])  # items 2 and 4 excluded
    assert target_ranks(scores, seen, torch.tensor([3])).item() == 0.0
    assert target_ranks(scores, seen, torch.tensor([4])).item() == 0.0  # seen, but the target stays eligible
    sets = ItemSets.from_lists([np.array([2, 4]), np.array([], np.int64), np.array([1])])
    assert sets.mask(0, 3, 5).tolist() == [
        [False, False, True, False, True], [False] * 5, [False, True, False, False, False]
    ]  # fmt: skip
    assert sets.take(np.array([2, 0])).row(1).tolist() == [2, 4]


def old_item_log() -> EventLog:
    """One user rates items 1..6 in order; the last rating is the only test event."""
    n, keys = 6, np.array([str(i) for i in range(1, 9)], dtype=object)
    split = np.array(["train"] * (n - 1) + ["test"])
    return EventLog(keys, np.array(["u"], dtype=object), np.zeros(n, np.int64), np.arange(1, n + 1), split)


def test_ranking_excludes_the_whole_history_not_only_the_input_window() -> None:
    ev = old_item_log()
    q = eval_queries(ev, "test", 2)  # the model reads items 4 and 5 only
    assert q.history.tolist() == [[4, 5]] and q.seen.row(0).tolist() == [1, 2, 3, 4, 5]

    def old_items_first(h: torch.Tensor) -> torch.Tensor:  # items 1..3 (outside the window) score highest
        return torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0, 1.0, 5.0, 0.0, 0.0]]).expand(h.shape[0], -1)

    assert rank_queries(old_items_first, q.history, q.target, q.seen).tolist() == [0.0]
    window_only = ItemSets.from_lists([q.history[0]])  # what the old evaluation excluded
    assert rank_queries(old_items_first, q.history, q.target, window_only).tolist() == [3.0]


def test_published_candidates_exclude_the_whole_history() -> None:
    from llmfeat.models.lite_llm4rec.candidates import top_candidates

    class OldItemsFirst(torch.nn.Module):
        def next_item_scores(self, h: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[0.0, 9.0, 8.0, 7.0, 6.0, 5.0, 1.0, 2.0, 3.0]]).expand(h.shape[0], -1)

    users, hist, seen = user_histories(old_item_log(), 2)
    assert hist.tolist() == [[5, 6]] and seen.row(0).tolist() == [1, 2, 3, 4, 5, 6]
    items, scores = top_candidates(OldItemsFirst(), hist, seen, 2)  # type: ignore[arg-type]
    assert items.tolist() == [[8, 7]] and scores.tolist() == [[3.0, 2.0]]


def test_user_bootstrap_resamples_users_not_queries() -> None:
    users = np.repeat(np.arange(20), 50)  # 20 users, 50 queries each, a user's queries all hit or all miss
    hits = (np.arange(20) % 2 == 0).astype(float)[users]
    iv = user_bootstrap_interval(hits, users, n_boot=400)
    assert iv.mean == pytest.approx(0.5)
    assert iv.high - iv.low > 0.3  # 20 independent users, not 1,000 queries (which would give about +-0.03)
    ranks = np.where(hits > 0, 0.0, 50.0)[None]  # (S=1, Q)
    rec, nd = paired_difference(ranks, ranks, 10, users)
    assert (rec.mean, rec.low, rec.high, nd.mean) == (0.0, 0.0, 0.0, 0.0)


def test_windows_and_queries_respect_time(lite_settings: Settings) -> None:
    from llmfeat.delta_io import RustDelta

    tables = RustDelta(lite_settings.delta_root)
    ev = event_log(tables.read_arrow("interactions"), tables.read_arrow("items"))
    win = train_windows(ev, 6)
    assert win.inputs.shape == win.targets.shape and win.inputs.shape[1] == 6
    real = win.targets > 0
    assert ((win.targets[real] - 1) == win.inputs[real] % N_ITEMS).all()  # next item in the cycle
    test = eval_queries(ev, "test", 6)
    assert len(test) > 0 and test.skipped_empty == 0
    assert ((test.history[:, -1] % N_ITEMS) + 1 == test.target).all()  # newest history item precedes target


@pytest.mark.parametrize("kind", ["sasrec", "lite"])
def test_models_score_all_items_without_nan(kind: str) -> None:
    cfg = SeqConfig(N_ITEMS, max_seq=5, dim=8, heads=2, blocks=1, dropout=0.0)
    model = SASRec(cfg) if kind == "sasrec" else LiteLLM4Rec(torch.randn(N_ITEMS, 6), cfg)
    seq = torch.tensor([[0, 0, 0, 0, 3], [1, 2, 3, 4, 5]])  # (B=2, S=5), left padded
    h = model(seq)
    assert h.shape == (2, 5, 8)
    scores = model.next_item_scores(seq)
    assert scores.shape == (2, N_ITEMS + 1) and torch.isfinite(scores).all()
    # causal: changing the newest item does not change earlier states
    seq2 = seq.clone()
    seq2[1, -1] = 7
    assert torch.allclose(model(seq2)[1, :-1], h[1, :-1], atol=1e-5)


def test_train_lite_beats_popularity_logs_and_publishes(lite_settings: Settings) -> None:
    import mlflow

    from llmfeat.spark_jobs.train_lite import run

    settings = lite_settings.model_copy(
        update={"lite": lite_settings.lite.model_copy(update={"publish_k": 4})}
    )
    summary = run(None, settings)
    by = {r.name: r for r in summary.results}
    assert set(by) == {"popularity", "sasrec", "lite"}
    pop, lite = by["popularity"].reports["all"], by["lite"].reports["all"]
    assert lite.recall.mean > pop.recall.mean + 0.3  # the cycle is learnable; popularity is flat
    assert lite.recall.low <= lite.recall.mean <= lite.recall.high
    assert "Recall@3" in str(summary)
    rec, _ = summary.differences["lite - popularity"]["all"]
    assert rec.mean == pytest.approx(lite.recall.mean - pop.recall.mean) and rec.low > 0  # paired, users
    assert "lite - sasrec" in str(summary)

    runs = mlflow.search_runs(experiment_names=["llmfeat-lite"], output_format="list")
    assert {r.data.params["model"] for r in runs} == {"popularity", "sasrec", "lite"}
    lite_run = next(r for r in runs if r.data.params["model"] == "lite")
    assert lite_run.data.tags["lineage.encoder_id"] == "tiny"
    assert lite_run.data.tags["lineage.layer"] == "2"
    assert "recall_at_3_all_low" in lite_run.data.metrics
    assert lite_run.data.tags["validation.user_candidates"].startswith("passed (user_candidates")
    assert lite_run.data.tags["data_docs.user_candidates"].endswith(".html")
    assert mlflow.active_run() is None

    from deltalake import DeltaTable

    table = DeltaTable(str(settings.delta_root / "user_candidates")).to_pyarrow_table()
    assert table.num_rows == N_USERS
    row = table.to_pylist()[0]
    assert len(row["candidate_items"]) == 4 and row["run_id"] == by["lite"].run_id
    assert row["candidate_scores"] == sorted(row["candidate_scores"], reverse=True)
    run(None, settings)  # idempotent: MERGE by user, no duplicates
    assert DeltaTable(str(settings.delta_root / "user_candidates")).to_pyarrow_table().num_rows == N_USERS
