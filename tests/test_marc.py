"""MARC modules, HSIC, metrics, baselines and the probe protocol on tiny synthetic tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmfeat.models.ctr.data import ctr_arrays
from llmfeat.models.evaluation.metrics import (
    auc,
    bootstrap_interval,
    gauc,
    logloss,
    paired_auc_difference,
    seed_interval,
)
from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_id_model, fit_probe, split_metrics
from llmfeat.models.marc.baselines import (
    as_dtype,
    bytes_per_vector,
    pca,
    quantise_int8,
    random_projection,
    truncation,
)
from llmfeat.models.marc.model import (
    Marc,
    MarcCompressor,
    MarcConfig,
    TaskAdaptation,
    hsic,
    normalised_hsic,
    rbf_kernel,
)
from llmfeat.models.marc.train import compress, fit_marc
from llmfeat.models.trainer import TrainConfig
from llmfeat.reprs import ReprError, layer_matrix

pytestmark = pytest.mark.unit


def test_shapes_of_every_part() -> None:
    cfg = MarcConfig(in_dim=12, out_dim=4, hidden_dim=8, task_dim=6)
    model = Marc(cfg)
    x_u, x_i = torch.randn(5, 12), torch.randn(5, 12)
    assert model.compressor("users")(x_u).shape == (5, 4)
    logit, t_u, t_i = model.task(torch.randn(5, 4), torch.randn(5, 4))
    assert logit.shape == (5,) and t_u.shape == (5, 6) and t_i.shape == (5, 6)
    assert model(x_u, x_i).shape == (5,)
    parts = model.loss(x_u, x_i, torch.tensor([0, 1, 0, 1, 1]))
    assert (
        parts.total.ndim == 0
        and 0 <= float(parts.keep.detach()) <= 1
        and 0 <= float(parts.indep.detach()) <= 1
    )
    parts.total.backward()  # every part gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_task_module_has_a_different_structure_from_the_compressor() -> None:
    compressor, task = MarcCompressor(12, 4, 8), TaskAdaptation(4, 6)
    kinds = {type(m).__name__ for m in compressor.modules()}
    assert "LayerNorm" in {type(m).__name__ for m in task.modules()} and "LayerNorm" not in kinds
    assert "GELU" in kinds


def test_hsic_matches_the_trace_formula_and_detects_dependence() -> None:
    torch.manual_seed(0)
    k, l_ = rbf_kernel(torch.randn(9, 3)), rbf_kernel(torch.randn(9, 2))
    h = torch.eye(9) - 1 / 9
    assert float(hsic(k, l_)) == pytest.approx(float(torch.trace(k @ h @ l_ @ h) / 64), abs=1e-6)
    x = torch.randn(64, 3)
    assert float(normalised_hsic(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(normalised_hsic(x, 2 * x + 1)) > 0.9  # the median width makes it scale-free
    assert float(normalised_hsic(x, torch.randn(64, 3))) < 0.3


def test_compressor_standardises_with_fitted_statistics() -> None:
    c = MarcCompressor(3, 2, 4)
    x = torch.tensor([[100.0, 0.0, 1.0], [300.0, 2.0, 1.0]])
    c.fit_standardiser(x)
    z = c.standardise(x)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-6)


def test_auc_gauc_logloss_against_hand_computed_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)  # ties count one half
    assert np.isnan(auc(np.ones(3), np.arange(3.0)))
    g = np.array(["a", "a", "a", "b", "b", "c"])
    yg = np.array([0, 1, 1, 0, 1, 1])  # user c has one label only: left out
    pg = np.array([0.2, 0.9, 0.1, 0.3, 0.4, 0.5])
    assert gauc(yg, pg, g) == pytest.approx((0.5 * 3 + 1.0 * 2) / 5)
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_intervals_cover_the_point_and_detect_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good, noise = y + rng.normal(0, 0.8, 400), rng.normal(0, 1, 400)
    ci = bootstrap_interval(lambda idx: auc(y[idx], good[idx]), 400, n_boot=200)
    assert ci.low <= ci.mean <= ci.high
    diff = paired_auc_difference(y, good[None], noise[None], n_boot=200)
    assert diff.excludes_zero() and diff.mean > 0
    s = seed_interval([0.70, 0.71, 0.72])
    assert s.low < 0.71 < s.high


def test_baselines_widths_and_int8_quantisation() -> None:
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    for fn in (pca, random_projection, truncation):
        assert fn(x, 4)(x).shape == (50, 4)
    q, scale = quantise_int8(x)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale.shape == (50,)
    assert np.abs(as_dtype(x, "int8") - x).max() <= scale.max() / 2 + 1e-6
    assert bytes_per_vector(64, "int8") == 68 and bytes_per_vector(576, "float32") == 2304
    assert 2304 / bytes_per_vector(64, "int8") >= 32  # the size target


def synthetic(n_users: int = 30, n_items: int = 20, n: int = 2400, dim: int = 12, seed: int = 0):  # type: ignore[no-untyped-def]
    """Rows whose label depends on the first state dimension of user and item."""
    rng = np.random.default_rng(seed)
    xu = rng.normal(size=(n_users, dim)).astype(np.float32)
    xi = rng.normal(size=(n_items, dim)).astype(np.float32)
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    label = (xu[u, 0] * xi[i, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    ts = np.sort(rng.integers(0, 10**6, n)) * 1_000_000
    q8, q9 = np.quantile(ts, [0.8, 0.9])
    split = np.where(ts < q8, "train", np.where(ts < q9, "valid", "test"))
    inter = pa.table(
        {
            "user_id": [str(k) for k in u],
            "item_id": [str(k) for k in i],
            "label": label,
            "split": split,
            "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
        }
    )
    users = pa.table({"user_id": [str(k) for k in range(n_users)]})
    items = pa.table({"item_id": [str(k) for k in range(n_items)]})
    return ctr_arrays(inter, users, items), xu, xi


def test_marc_training_learns_the_task_and_compresses() -> None:
    torch.set_num_threads(1)
    a, xu, xi = synthetic()
    cfg = MarcConfig(in_dim=12, out_dim=4, hidden_dim=16, task_dim=8, dropout=0.0)
    fit = fit_marc(a, xu, xi, cfg, TrainConfig(lr=1e-2, batch_size=128, max_epochs=8, patience=8))
    assert fit.history.best_score > 0.7
    assert set(fit.history.extra) == {"bce", "hsic_keep", "hsic_indep"}
    assert compress(fit.compressor("items"), xi).shape == (20, 4)


def test_probe_protocol_fits_on_valid_and_reports_warm_and_cold() -> None:
    torch.set_num_threads(1)
    a, xu, xi = synthetic()
    cfg = ProtocolConfig(n_boot=50)
    id_logit = fit_id_model(a, cfg)
    run = fit_probe(a, id_logit, xu, xi, cfg, seed=0)
    assert run.test_pred.shape == (len(a.rows("test")),)
    m = split_metrics(a, run.test_pred[None], n_boot=50)
    assert {"auc_all", "auc_warm", "auc_cold", "gauc_all", "logloss_all"} <= set(m)
    assert m["auc_all"].mean > 0.5


def test_repr_matrix_errors_name_key_and_table() -> None:
    table = pa.table(
        {
            "item_id": ["1", "2", "1"],
            "layer": [3, 3, 5],
            "vector": pa.array([[1.0, 2.0], [float("nan"), 1.0], [1.0, 1.0]], pa.list_(pa.float32())),
        }
    )
    keys = np.array(["1"], dtype=object)
    assert layer_matrix(table, "items", 3, keys).shape == (1, 2)
    with pytest.raises(ReprError, match="item_id='2'.*NaN"):
        layer_matrix(table, "items", 3, np.array(["1", "2"], dtype=object))
    with pytest.raises(ReprError, match="layer 7 not present"):
        layer_matrix(table, "items", 7, keys)
    with pytest.raises(ReprError, match="item_id='9'"):
        layer_matrix(table, "items", 5, np.array(["9"], dtype=object))


def test_sweep_and_report_on_a_tiny_bundle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from llmfeat.models.marc.sweep import SweepConfig, run_sweep
    from llmfeat.spark_jobs.eval_compression import markdown, plots, to_json

    torch.set_num_threads(1)
    a, xu, xi = synthetic(n_users=40, n_items=30, n=1500, dim=24)
    states = {2: (xu, xi), 4: (xu * 2 + 1, xi - 1)}

    def marc(layer: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = MarcConfig(in_dim=24, out_dim=d, hidden_dim=16, task_dim=8)
        fit = fit_marc(a, *states[layer], cfg, TrainConfig(batch_size=256, max_epochs=2, patience=2))
        return compress(fit.compressor("users"), states[layer][0]), compress(
            fit.compressor("items"), states[layer][1]
        )

    cfg = SweepConfig(seeds=1, out_dim=8, widths=(4, 8), protocol=ProtocolConfig(n_boot=20))
    r = run_sweep(a, states.__getitem__, [2, 4], marc, cfg)
    assert r.best_layer == 2 and r.final_layer == 4
    assert [e.method for e in r.table][:2] == ["uncompressed", "pca_final"]
    assert {e.bytes for e in r.widths} == {8, 12}  # int8 codes + a 4-byte scale
    assert "marc_int8 - pca_int8" in r.differences
    assert "| marc | 2 | 8 | int8 | 12 |" in markdown(r)
    assert all(p.stat().st_size > 0 for p in plots(r, tmp_path))
    assert to_json(r)["best_layer"] == 2


def test_mlflow_project_entry_points_exist_and_mlflow_stays_the_library() -> None:
    import importlib.util
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "mlflow"
    assert not (root / "__init__.py").exists()
    project = yaml.safe_load((root / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        script = entry["command"].split()[1]
        assert (root / script).exists(), name
    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None and "site-packages" in spec.origin


def test_point_in_time_rows_take_the_newest_snapshot_at_or_before_them() -> None:
    from llmfeat.models.ctr.data import CtrArrays, point_in_time

    a = CtrArrays(
        user_keys=np.array(["u1", "u2"], dtype=object),
        item_keys=np.array(["i"], dtype=object),
        user_idx=np.array([0, 0, 0, 1]),
        item_idx=np.zeros(4, dtype=np.int64),
        label=np.ones(4, np.float32),
        split=np.array(["train"] * 4, dtype=object),
        timestamp=np.array([10, 20, 30, 15]),
        dense=np.zeros((4, 0), np.float32),
        warm=np.zeros(4, bool),
    )
    keys = np.array(["u1@a", "u1@b", "u2@a"], dtype=object)
    pit = point_in_time(a, keys, np.array(["u1", "u1", "u2"], dtype=object), np.array([10, 25, 15]))
    assert pit.user_idx.tolist() == [0, 0, 1, 2]  # at its own time, then the newer one; never a later one
    with pytest.raises(ReprError, match="u1"):
        point_in_time(a, keys[1:], np.array(["u1", "u2"], dtype=object), np.array([25, 15]))


def test_marc_periods_fit_then_stop_then_the_ctr_rows() -> None:
    from llmfeat.models.marc.train import marc_periods

    ts = np.arange(100)
    split = np.where(ts < 80, "train", "test")
    p = marc_periods(ts, split, fit_frac=0.5, stop_frac=0.25)
    fit, stop, after = (np.flatnonzero(p[k]) for k in ("marc_fit", "marc_stop", "after"))
    assert fit.max() < stop.min() and stop.max() < after.min()  # stops on rows later than it fits
    assert after.max() == 99 and not (p["marc_fit"] & p["after"]).any()
