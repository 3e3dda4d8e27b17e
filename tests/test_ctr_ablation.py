"""The CTR ablation: point-in-time counters and histories at either freshness, the cold-items world, the
user-resampled paired differences, and a run of every protocol and both families on the tiny lake."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_ctr_lake import build_lake

from llmfeat.delta_io import RustDelta
from llmfeat.models.ctr.history import earlier_counts, history_means
from llmfeat.models.evaluation.ab_stats import paired_deltas, paired_differences
from llmfeat.models.evaluation.metrics import user_weights
from llmfeat.spark_jobs import ctr_ablation


def brute_counts(keys: np.ndarray, times: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    earlier = (keys[:, None] == keys[None, :]) & (times[None, :] < times[:, None])  # (row, other)
    return earlier.sum(axis=1), (earlier * labels[None, :]).sum(axis=1)


@pytest.mark.unit
def test_counts_and_histories_see_strictly_earlier_times_only() -> None:
    rng = np.random.default_rng(3)
    n = 400
    keys, times, labels = rng.integers(0, 9, n), rng.integers(0, 30, n), rng.integers(0, 2, n)
    events, liked = earlier_counts(keys, times, labels)
    want_events, want_liked = brute_counts(keys, times, labels)
    np.testing.assert_array_equal(events, want_events)  # rows at the same time never see each other
    np.testing.assert_array_equal(liked, want_liked)
    items = rng.integers(0, 5, n)
    vectors = rng.normal(size=(5, 3))
    hist = history_means(keys, items, times, labels, vectors)
    for row in rng.choice(n, 20, replace=False):
        seen = (keys == keys[row]) & (times < times[row])
        for lab, part in ((1, hist[row, :3]), (0, hist[row, 3:])):
            chosen = items[seen & (labels == lab)]
            want = vectors[chosen].mean(axis=0) if len(chosen) else np.zeros(3)
            np.testing.assert_allclose(part, want, atol=1e-5)


@pytest.mark.unit
def test_paired_deltas_are_the_user_bootstrap_of_paired_differences() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    y, users = rng.integers(0, 2, n), rng.integers(0, 80, n)
    p_a, p_b = rng.random(n) * 0.5 + 0.2 * y, rng.random(n) * 0.5 + 0.3 * y
    fast = paired_deltas(y, p_a, p_b, user_weights(users, 200))
    slow = paired_differences(y, p_a, p_b, users, 200)
    for metric in ("auc", "logloss"):
        for got, want in zip(vars(fast[metric]).values(), vars(slow[metric]).values(), strict=True):
            assert got == pytest.approx(want, abs=1e-6), metric
    assert fast["auc"].low > 0  # b is better, and its interval says so


def with_item_states(settings, layers: tuple[int, ...] = (1, 2), dim: int = 12) -> None:  # type: ignore[no-untyped-def]
    """An items_repr table (the encode job's layout, the columns the ablation reads) for the tiny lake."""
    tables = RustDelta(settings.delta_root)
    items = tables.read_arrow("items")["item_id"].to_pylist()
    rng = np.random.default_rng(1)
    rows = [(i, layer, rng.normal(size=dim).astype(np.float32).tolist()) for layer in layers for i in items]
    table = pa.table(
        {
            "item_id": [r[0] for r in rows],
            "layer": pa.array([r[1] for r in rows], pa.int32()),
            "vector": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
        }
    )
    tables.write("items_repr", table)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    settings = build_lake(tmp_path_factory.mktemp("ablation"), "ctr.tree_min_leaf=5", "ctr.n_boot=100")
    with_item_states(settings)
    return settings


@pytest.mark.integration
def test_cold_items_are_launched_at_the_test_period(lake) -> None:  # type: ignore[no-untyped-def]
    ev = ctr_ablation.load_events(lake, [1])
    cold = np.zeros(len(ev.item_keys), bool)
    cold[:10] = True
    world = ctr_ablation.build_world(ev, "cold_items", 1, cold, lake, ["llm"])
    f = world.frames["llm"]
    is_cold = f["item_id"].isin(set(ev.item_keys[:10])).to_numpy()
    assert is_cold.any() and not (is_cold & ~world.masks["test"]).any()  # no earlier row holds them
    assert world.slices["cold items"].tolist() == is_cold.tolist()
    # their first test rows see no earlier event of theirs, in any counter
    first = f[is_cold].groupby("item_id").head(1)
    assert first["item_event_count"].eq(0).all() and first["item_impressions"].eq(0).all()


@pytest.mark.integration
def test_every_protocol_and_family_writes_comparisons(lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "docs"
    ctr_ablation.run(None, lake, "lightgbm", ctr_ablation.PROTOCOLS, (1, 2), 2, 0.5, out, "pca")
    dnn = lake.model_copy(update={"ctr": lake.ctr.model_copy(update={"max_epochs": 1, "hidden": [8]})})
    ctr_ablation.run(None, dnn, "dnn", ["fresh"], (1, 2), 1, 0.5, out, "pca")
    ctr_ablation.run(None, dnn, "dnn", ["daily"], (1, 2), 1, 0.5, out, "pca")  # merged beside "fresh"
    stored = json.loads((out / "ctr_results.json").read_text())
    trees = stored["runs"]["lightgbm / pca"]["protocols"]
    assert trees["fresh"]["layer"] in (1, 2) and set(trees["daily"]["layer_curve"]) == {"1", "2"}
    assert stored["runs"]["dnn / pca"]["protocols"]["fresh"]["layer"] == trees["fresh"]["layer"]
    assert {c["protocol"] for c in stored["comparisons"] if c["family"] == "dnn"} == {"fresh", "daily"}
    comparisons = stored["comparisons"]
    keys = {"protocol", "slice", "a", "b", "a_uses_llm", "b_uses_llm", "family", "representation", "metric",
            "diff", "rows", "users", "n_boot", "seeds", "detectable"}  # fmt: skip
    assert all(keys <= set(c) for c in comparisons)
    assert {c["family"] for c in comparisons} == {"lightgbm", "dnn"}
    assert {c["protocol"] for c in comparisons if c["family"] == "lightgbm"} == set(ctr_ablation.PROTOCOLS)
    headline = [c for c in comparisons if c["family"] == "lightgbm" and c["b"] == ctr_ablation.BOTH
                and c["a"] == ctr_ablation.BASE and c["slice"] == "all" and c["metric"] == "auc"]  # fmt: skip
    assert len(headline) == 2 and all(c["seeds"] == 2 and c["n_boot"] == 100 for c in headline)
    assert all(c["diff"][1] <= c["diff"][0] <= c["diff"][2] for c in headline)
    cold = [c for c in comparisons if c["protocol"] == "cold_items" and c["family"] == "lightgbm"]
    # two disjoint draws of half the items: every test row is scored once cold and once warm
    test_rows = next(c["rows"] for c in headline if c["protocol"] == "fresh")
    assert {c["rows"] for c in cold if c["slice"] in ("cold items", "warm items")} == {test_rows}
    assert stored["runs"]["lightgbm / pca"]["cold_item_folds"] == 2
    assert any(c["slice"].startswith("cold items, item events") for c in cold)
    assert "| + both | ids + counters + content | all |" in (out / "ctr_results.md").read_text()


@pytest.mark.integration
def test_marc_items_are_fitted_without_the_held_out_items(tmp_path: Path) -> None:
    """The MARC representation: fitted per layer on user snapshots and items like train-compressor, once
    for the protocols that hold nothing out and once more without the cold items' rows."""
    from deltalake import write_deltalake
    from test_compress import N_ITEMS, tiny_settings, write_inputs

    write_inputs(tmp_path / "delta")
    keys = [str(k) for k in range(N_ITEMS)]
    genres = ["A|B" if k % 2 else "C" for k in range(N_ITEMS)]
    items = pa.table({"item_id": keys, "year": pa.array([1990] * N_ITEMS, pa.int64()), "genres": genres})
    write_deltalake(str(tmp_path / "delta" / "items"), items, mode="overwrite", schema_mode="overwrite")
    settings = tiny_settings(tmp_path)
    settings = settings.model_copy(update={"ctr": settings.ctr.model_copy(update={"tree_min_leaf": 5})})
    ev = ctr_ablation.load_events(settings, [])
    llm = ctr_ablation.LlmItems(ev, settings, "marc")
    assert llm.layers([2, 3, 4]) == [2, 4]  # the layers the user snapshots have
    cold = np.zeros(len(ev.item_keys), bool)
    cold[:3] = True
    everything = llm(4, np.arange(len(ev.item_keys)), np.zeros_like(cold))
    without = llm(4, np.arange(len(ev.item_keys)), cold)
    assert everything.shape == without.shape == (N_ITEMS, 3) and len(llm.fits) == 2
    assert not np.allclose(everything, without)  # a different fit: the held-out items' rows are gone
    assert np.array_equal(llm(4, np.arange(len(ev.item_keys)), cold), without)  # fitted once per held-out set


def test_cold_folds_are_disjoint_draws_of_the_share() -> None:
    folds = ctr_ablation.cold_folds(1682, 0.2, 7)
    assert len(folds) == 5 and all(f.sum() == 336 for f in folds)
    assert np.stack(folds).sum(0).max() == 1  # no item is cold twice
    assert [f.tolist() for f in ctr_ablation.cold_folds(1682, 0.2, 7, folds=2)] == [
        f.tolist() for f in folds[:2]
    ]
