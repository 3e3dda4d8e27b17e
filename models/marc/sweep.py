"""The layer sweep and the compression comparison, judged by the fixed CTR probe (evaluation/probe_eval.py).

Notation: U users, I items, D layer width, d compressed width, S seeds.

1. Layer sweep: for every source layer, the probe on the raw (standardised) layer and on PCA to d.
2. The best middle layer L* is chosen by the probe's early-stopping AUC on the valid split (never test).
3. At L* and equal bytes per vector: PCA on the final layer, PCA on L*, random projection, truncation, MARC,
   each stored as float16 and as int8 with a per-row scale; the uncompressed L* is the quality reference.
4. Bytes curve: every method at several widths d, int8.
Every entry carries test AUC / GAUC / LogLoss (all, warm, cold users) with intervals, and its per-seed test
predictions so that differences can be tested pairwise on the same rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.evaluation.metrics import Interval, paired_auc_difference
from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_id_model, fit_probe, split_metrics
from llmfeat.models.marc.baselines import BASELINES, as_dtype, bytes_per_vector, identity

log = logging.getLogger(__name__)
_CTX: dict[str, Any] = {}  # what forked workers inherit: arrays, states(), the MARC trainer, the config


class Pool:
    """Runs jobs in `workers` processes forked before any autograd use (torch forbids forking after it),
    or in this process when workers is 1. Jobs are plain tuples; data comes from `_CTX`."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread)

    def map(self, jobs: list[tuple[Any, ...]]) -> list[Any]:
        if self.pool is None:
            return [_run_job(j) for j in jobs]
        return self.pool.map(_run_job, jobs, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _run_job(job: tuple[Any, ...]) -> Any:
    kind, *args = job
    a, states, cfg = _CTX["a"], _CTX["states"], _CTX["cfg"]
    if kind == "id":
        return fit_id_model(a, cfg.protocol, args[0])
    if kind == "marc":
        return _CTX["marc"](*args)
    if kind == "layer":
        layer, id_logits = args
        ev, (xu, xi), d = Evaluator(a, cfg, id_logits), states(layer), cfg.out_dim
        raw = ev.evaluate("uncompressed", layer, project(lambda x, _: identity(x), xu, xi, 0))
        return raw, ev.evaluate("pca", layer, project(BASELINES["pca"], xu, xi, d), "float16")
    method, layer, vectors, dtype, id_logits = args
    return Evaluator(a, cfg, id_logits).evaluate(method, layer, vectors, dtype)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


Vectors = tuple[np.ndarray, np.ndarray]  # (U, d) users, (I, d) items


@dataclass(frozen=True)
class SweepConfig:
    seeds: int = 3
    out_dim: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)
    sweep_layers: tuple[int, ...] | None = None  # None: every layer in the tables
    marc_layers: tuple[int, ...] = ()  # extra layers to train MARC on for the layer plot
    protocol: ProtocolConfig = ProtocolConfig()
    workers: int = 1  # processes for independent fits (fork); 1 = in this process


@dataclass
class Entry:
    method: str
    layer: int
    dim: int
    dtype: str
    bytes: int
    metrics: dict[str, Interval]
    stop_auc: float
    preds: np.ndarray = field(repr=False)  # (S, N_test)

    def row(self) -> dict[str, object]:
        out: dict[str, object] = {
            "method": self.method, "layer": self.layer, "dim": self.dim, "dtype": self.dtype,
            "bytes": self.bytes, "stop_auc": self.stop_auc,
        }  # fmt: skip
        for k, v in self.metrics.items():
            out[k] = [v.mean, v.low, v.high]
        return out


class Evaluator:
    """Holds the arrays, the per-seed ID logits and the states; evaluates one pair of vector tables."""

    def __init__(self, a: CtrArrays, cfg: SweepConfig, id_logits: list[np.ndarray]):
        self.a, self.cfg, self.id_logits = a, cfg, id_logits

    def evaluate(self, method: str, layer: int, vectors: Vectors, dtype: str = "float32") -> Entry:
        vu, vi = (as_dtype(v, dtype) if v.shape[1] else v for v in vectors)
        runs = [
            fit_probe(self.a, self.id_logits[s], vu, vi, self.cfg.protocol, seed=s)
            for s in range(self.cfg.seeds)
        ]
        preds = np.stack([r.test_pred for r in runs])
        dim = vu.shape[1]
        metrics = split_metrics(self.a, preds, self.cfg.protocol.n_boot)
        size = bytes_per_vector(dim, dtype) if dim else 0
        entry = Entry(
            method, layer, dim, dtype, size, metrics, float(np.mean([r.stop_auc for r in runs])), preds
        )
        log.info(
            "%-18s layer %2d d %4d %-7s test AUC %s (valid %.4f)", method, layer, dim, dtype,
            entry.metrics["auc_all"], entry.stop_auc,
        )  # fmt: skip
        return entry

    def difference(self, a: Entry, b: Entry) -> Interval:
        """AUC(a) - AUC(b) on the same test rows, seed-averaged, paired bootstrap interval."""
        y = self.a.label[self.a.rows("test")]
        return paired_auc_difference(y, a.preds, b.preds, n_boot=1000)


def project(fit: Callable[[np.ndarray, int], Callable[[np.ndarray], np.ndarray]], xu: np.ndarray,
            xi: np.ndarray, d: int) -> Vectors:  # fmt: skip
    """Fit a baseline per entity on all of that entity's states (label-free), apply it."""
    return fit(xu, d)(xu), fit(xi, d)(xi)


MarcTrainer = Callable[[int, int], Vectors]  # (layer, d) -> compressed (users, items), float32


@dataclass
class SweepResult:
    id_only: Entry
    layer_raw: list[Entry]
    layer_pca: list[Entry]
    layer_marc: list[Entry]
    best_layer: int
    final_layer: int
    table: list[Entry]
    widths: list[Entry]
    differences: dict[str, Interval]


def run_sweep(
    a: CtrArrays, states: Callable[[int], Vectors], layers: list[int], marc: MarcTrainer, cfg: SweepConfig
) -> SweepResult:
    """states(layer) -> raw (users, items) matrices; marc(layer, d) trains MARC and compresses both tables."""
    _CTX.update(a=a, states=states, marc=marc, cfg=cfg)
    pool = Pool(cfg.workers)
    try:
        return _sweep(pool, a, states, layers, cfg)
    finally:
        pool.close()
        _CTX.clear()


def _sweep(
    pool: Pool, a: CtrArrays, states: Callable[[int], Vectors], layers: list[int], cfg: SweepConfig
) -> SweepResult:
    started = time.monotonic()
    id_logits = pool.map([("id", seed) for seed in range(cfg.seeds)])
    log.info("ID model fitted for %d seeds in %.0f s", cfg.seeds, time.monotonic() - started)
    ev = Evaluator(a, cfg, id_logits)
    none = (np.zeros((len(a.user_keys), 0), np.float32), np.zeros((len(a.item_keys), 0), np.float32))
    sweep = [layer for layer in layers if cfg.sweep_layers is None or layer in cfg.sweep_layers]
    final, d = max(layers), cfg.out_dim
    pairs = pool.map(
        [("eval", "id_only", 0, none, "float32", id_logits)] + [("layer", l_, id_logits) for l_ in sweep]
    )
    id_only, pairs = pairs[0], pairs[1:]
    raw, pca = [p[0] for p in pairs], [p[1] for p in pairs]
    mid = [e for e in pca if e.layer != final]
    best = max(mid, key=lambda e: e.stop_auc).layer if mid else final
    log.info("best middle layer by valid AUC of PCA-%d: %d", d, best)
    xu, xi = states(best)
    xu_f, xi_f = states(final)
    marc_jobs = [(layer, d) for layer in sorted({best, final, *cfg.marc_layers})]
    marc_jobs += [(best, w) for w in cfg.widths if w != d]
    trained = dict(zip(marc_jobs, pool.map([("marc", *job) for job in marc_jobs]), strict=True))
    marc_vectors = {layer: v for (layer, w), v in trained.items() if w == d}
    reference = next((e for e in raw if e.layer == best), None)
    identity_best = project(lambda x, _: identity(x), xu, xi, 0)
    candidates: dict[tuple[str, int], Vectors] = {
        ("pca_final", final): project(BASELINES["pca"], xu_f, xi_f, d),
        ("pca", best): project(BASELINES["pca"], xu, xi, d),
        ("random_projection", best): project(BASELINES["random_projection"], xu, xi, d),
        ("truncation", best): project(BASELINES["truncation"], xu, xi, d),
        ("marc", best): marc_vectors[best],
    }
    jobs: list[tuple[Any, ...]] = [
        ("eval", "marc", layer, v, "float16", id_logits) for layer, v in marc_vectors.items()
    ]
    jobs += [("eval", "uncompressed", best, identity_best, "float32", id_logits)] if reference is None else []
    jobs += [
        ("eval", method, layer, vectors, dtype, id_logits)
        for (method, layer), vectors in candidates.items()
        for dtype in ("float16", "int8")
    ]
    for w in cfg.widths:
        for method in ("pca", "random_projection", "truncation", "marc"):
            vectors = trained[(best, w)] if method == "marc" else project(BASELINES[method], xu, xi, w)
            jobs.append(("eval", method, best, vectors, "int8", id_logits))
    entries = pool.map(jobs)
    layer_marc, entries = entries[: len(marc_vectors)], entries[len(marc_vectors) :]
    if reference is None:
        reference, entries = entries[0], entries[1:]
    n_table = 2 * len(candidates)
    table, widths = [reference, *entries[:n_table]], entries[n_table:]
    diffs = differences(ev, table, reference)
    return SweepResult(id_only, raw, pca, layer_marc, best, final, table, widths, diffs)


def differences(ev: Evaluator, table: list[Entry], reference: Entry) -> dict[str, Interval]:
    """The issue's targets as paired differences: MARC int8 vs the uncompressed layer and vs each baseline."""
    find = {(e.method, e.dtype): e for e in table}
    marc8 = find[("marc", "int8")]
    out = {"marc_int8 - uncompressed": ev.difference(marc8, reference)}
    for method in ("pca", "pca_final", "random_projection", "truncation"):
        out[f"marc_int8 - {method}_int8"] = ev.difference(marc8, find[(method, "int8")])
    for method in ("marc", "pca"):
        out[f"{method}_int8 - {method}_float16"] = ev.difference(
            find[(method, "int8")], find[(method, "float16")]
        )
    return out
