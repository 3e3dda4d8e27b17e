"""The layer sweep and the compression comparison, judged by the fixed CTR probe (models/probe_eval.py).

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

import numpy as np

from models.baselines import BASELINES, as_dtype, bytes_per_vector, identity
from models.ctr_data import CtrArrays
from models.metrics import Interval, paired_auc_difference
from models.probe_eval import ProtocolConfig, fit_id_model, fit_probe, split_metrics

log = logging.getLogger(__name__)
Vectors = tuple[np.ndarray, np.ndarray]  # (U, d) users, (I, d) items


@dataclass(frozen=True)
class SweepConfig:
    seeds: int = 3
    out_dim: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)
    sweep_layers: tuple[int, ...] | None = None  # None: every layer in the tables
    marc_layers: tuple[int, ...] = ()  # extra layers to train MARC on for the layer plot
    protocol: ProtocolConfig = ProtocolConfig()


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

    def __init__(self, a: CtrArrays, cfg: SweepConfig):
        self.a, self.cfg = a, cfg
        started = time.monotonic()
        self.id_logits = [fit_id_model(a, cfg.protocol, seed) for seed in range(cfg.seeds)]
        log.info("ID model fitted for %d seeds in %.0f s", cfg.seeds, time.monotonic() - started)

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
    ev = Evaluator(a, cfg)
    none = (np.zeros((len(a.user_keys), 0), np.float32), np.zeros((len(a.item_keys), 0), np.float32))
    id_only = ev.evaluate("id_only", 0, none)
    sweep = [layer for layer in layers if cfg.sweep_layers is None or layer in cfg.sweep_layers]
    final, d = max(layers), cfg.out_dim
    raw, pca = [], []
    for layer in sweep:
        xu, xi = states(layer)
        raw.append(ev.evaluate("uncompressed", layer, project(lambda x, _: identity(x), xu, xi, 0)))
        pca.append(ev.evaluate("pca", layer, project(BASELINES["pca"], xu, xi, d), "float16"))
    mid = [e for e in pca if e.layer != final]
    best = max(mid, key=lambda e: e.stop_auc).layer if mid else final
    log.info("best middle layer by valid AUC of PCA-%d: %d", d, best)
    xu, xi = states(best)
    xu_f, xi_f = states(final)
    marc_vectors = {layer: marc(layer, d) for layer in sorted({best, final, *cfg.marc_layers})}
    layer_marc = [ev.evaluate("marc", layer, v, "float16") for layer, v in marc_vectors.items()]
    reference = next(e for e in raw if e.layer == best) if best in sweep else None
    if reference is None:
        reference = ev.evaluate("uncompressed", best, project(lambda x, _: identity(x), xu, xi, 0))
    table = [reference]
    candidates: dict[tuple[str, int], Vectors] = {
        ("pca_final", final): project(BASELINES["pca"], xu_f, xi_f, d),
        ("pca", best): project(BASELINES["pca"], xu, xi, d),
        ("random_projection", best): project(BASELINES["random_projection"], xu, xi, d),
        ("truncation", best): project(BASELINES["truncation"], xu, xi, d),
        ("marc", best): marc_vectors[best],
    }
    for (method, layer), vectors in candidates.items():
        for dtype in ("float16", "int8"):
            table.append(ev.evaluate(method, layer, vectors, dtype))
    widths = []
    for w in cfg.widths:
        for method in ("pca", "random_projection", "truncation", "marc"):
            if method == "marc":
                vectors = marc_vectors[best] if w == d else marc(best, w)
            else:
                vectors = project(BASELINES[method], xu, xi, w)
            widths.append(ev.evaluate(method, best, vectors, "int8"))
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
