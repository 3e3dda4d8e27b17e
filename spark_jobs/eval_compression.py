"""`llmfeat eval-compression`: run the sweep on the Delta tables and write the table, the plots and a JSON
record (docs/ by default), and log all of them to MLflow.

Outputs: marc_results.md (tables), marc_layers.png (test AUC by source layer, raw vs compressed),
marc_bytes.png (test AUC against bytes per vector, per method), marc_results.json (every number).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmfeat.job_args import sweep_args
from llmfeat.models.ctr.data import ctr_arrays
from llmfeat.models.marc.sweep import Entry, SweepConfig, SweepResult, Vectors, run_sweep
from llmfeat.reprs import layer_matrix, repr_layers, repr_table
from llmfeat.sample import Sample

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings

log = logging.getLogger(__name__)


def load(settings: Settings):  # type: ignore[no-untyped-def]
    """Arrays, a cached states(layer) function and the layers present in both representation tables."""
    from llmfeat.delta_io import open_tables

    sample = Sample(open_tables(settings), settings.sample)
    a = ctr_arrays(*sample.ctr_tables())
    reprs = {
        "users": sample.read(repr_table("users")),
        "items": sample.read(repr_table("items"), item_id=a.item_keys),
    }
    layers = sorted(set(repr_layers(reprs["users"])) & set(repr_layers(reprs["items"])))
    cache: dict[int, Vectors] = {}

    def states(layer: int) -> Vectors:
        if layer not in cache:
            cache[layer] = (
                layer_matrix(reprs["users"], "users", layer, a.user_keys),
                layer_matrix(reprs["items"], "items", layer, a.item_keys),
            )
        return cache[layer]

    return a, states, layers


def marc_trainer(a, states, settings: Settings):  # type: ignore[no-untyped-def]
    from llmfeat.models.marc.train import compress, fit_marc
    from llmfeat.spark_jobs.train_compressor import marc_config, train_config

    def train(layer: int, d: int) -> Vectors:
        xu, xi = states(layer)
        cfg = settings.marc.model_copy(update={"out_dim": d, "layer": layer})
        fit = fit_marc(a, xu, xi, marc_config(cfg, xu.shape[1]), train_config(cfg), fit_split="train")
        log.info("MARC layer %d d %d: valid AUC %.4f", layer, d, fit.history.best_score)
        return compress(fit.compressor("users"), xu), compress(fit.compressor("items"), xi)

    return train


def fmt(e: Entry, key: str) -> str:
    v = e.metrics[key]
    if np.isnan(v.low):
        return f"{v.mean:.4f}"
    return f"{v.mean:.4f} [{v.low:.4f}, {v.high:.4f}]"


def markdown(r: SweepResult) -> str:
    head = (
        "| method | layer | d | dtype | bytes/vector | MB per 1M | test AUC [95%] | warm AUC | cold AUC "
        "| GAUC | LogLoss |"
    )
    rule = "|" + "---|" * 11
    lines = [head, rule]
    for e in [r.id_only, *r.table]:
        b = e.bytes
        lines.append(
            f"| {e.method} | {e.layer or '-'} | {e.dim} | {e.dtype} | {b} | {b:.0f} | {fmt(e, 'auc_all')} | "
            f"{fmt(e, 'auc_warm')} | {fmt(e, 'auc_cold')} | {fmt(e, 'gauc_all')} | {fmt(e, 'logloss_all')} |"
        )
    lines += [
        "",
        "| paired difference (test AUC, seed mean) | mean [95%] | interval excludes 0 |",
        "|---|---|---|",
    ]
    for name, v in r.differences.items():
        lines.append(
            f"| {name} | {v.mean:+.4f} [{v.low:+.4f}, {v.high:+.4f}] | "
            f"{'yes' if v.excludes_zero() else 'no'} |"
        )
    lines += [
        "",
        "| layer | raw test AUC | PCA-64 test AUC | raw valid AUC | PCA-64 valid AUC |",
        "|---|---|---|---|---|",
    ]
    for raw, pca in zip(r.layer_raw, r.layer_pca, strict=True):
        lines.append(
            f"| {raw.layer} | {fmt(raw, 'auc_all')} | {fmt(pca, 'auc_all')} | {raw.stop_auc:.4f} "
            f"| {pca.stop_auc:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plots(r: SweepResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(entries: list[Entry]) -> tuple[list[int], np.ndarray, np.ndarray]:
        m = np.array(
            [
                [e.metrics["auc_all"].mean, e.metrics["auc_all"].low, e.metrics["auc_all"].high]
                for e in entries
            ]
        )
        return [e.layer for e in entries], m[:, 0], np.abs(m[:, 1:].T - m[:, 0])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves = (
        (r.layer_raw, "raw layer (576 float32)", "o"),
        (r.layer_pca, "PCA-64 float16", "s"),
        (r.layer_marc, "MARC-64 float16", "D"),
    )
    for entries, label, marker in curves:
        if entries:
            x, y, err = series(entries)
            ax.errorbar(
                x, y, yerr=err, marker=marker, capsize=2, label=label, linestyle="-" if len(x) > 2 else ""
            )
    ax.axhline(r.id_only.metrics["auc_all"].mean, color="grey", linestyle="--", label="ID model only")
    ax.axvline(
        r.best_layer, color="green", alpha=0.3, label=f"best middle layer by valid AUC ({r.best_layer})"
    )
    ax.set_xlabel("source layer of SmolLM2-135M (mean pooled)")
    ax.set_ylabel("test AUC (ID model + user/item vectors)")
    ax.set_title("ML-100k, time split: test AUC by source layer (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    layers_png = out / "marc_layers.png"
    fig.savefig(layers_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in ("pca", "random_projection", "truncation", "marc"):
        es = sorted((e for e in r.widths if e.method == method), key=lambda e: e.bytes)
        ax.plot(
            [e.bytes for e in es],
            [e.metrics["auc_all"].mean for e in es],
            marker="o",
            label=f"{method} (int8)",
        )
    ref = r.table[0]
    ax.scatter([ref.bytes], [ref.metrics["auc_all"].mean], marker="*", s=120, color="black",
               label=f"uncompressed layer {ref.layer} ({ref.dim} float32)")  # fmt: skip
    ax.axhline(r.id_only.metrics["auc_all"].mean, color="grey", linestyle="--", label="ID model only")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector (int8 codes + 4-byte scale)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"Test AUC against size, source layer {r.best_layer}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    bytes_png = out / "marc_bytes.png"
    fig.savefig(bytes_png, dpi=120)
    plt.close(fig)
    return [layers_png, bytes_png]


def to_json(r: SweepResult) -> dict[str, object]:
    return {
        "best_layer": r.best_layer,
        "final_layer": r.final_layer,
        "id_only": r.id_only.row(),
        "layer_raw": [e.row() for e in r.layer_raw],
        "layer_pca": [e.row() for e in r.layer_pca],
        "layer_marc": [e.row() for e in r.layer_marc],
        "table": [e.row() for e in r.table],
        "widths": [e.row() for e in r.widths],
        "differences": {k: [v.mean, v.low, v.high] for k, v in r.differences.items()},
    }


def sweep_config(seeds: int = 3, layers: str = "", marc_layers: str = "") -> SweepConfig:
    """From the command line: comma lists of layers ("" = every layer / none)."""

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    return SweepConfig(seeds=seeds, sweep_layers=ints(layers) or None, marc_layers=ints(marc_layers))


def run(
    spark: SparkSession | None, settings: Settings, cfg: SweepConfig | None = None, out: Path = Path("docs")
) -> SweepResult:
    """The layer sweep and the compression baselines (no Spark): table, plots and JSON in `out`, one MLflow
    run."""
    cfg = cfg or SweepConfig()
    import mlflow
    import torch

    from llmfeat.registry import use_tracking

    torch.set_num_threads(min(2, torch.get_num_threads()))
    a, states, layers = load(settings)
    result = run_sweep(a, states, layers, marc_trainer(a, states, settings), cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "marc_results.json").write_text(json.dumps(to_json(result), indent=1))
    (out / "marc_results.md").write_text(markdown(result))
    pngs = plots(result, out)
    use_tracking(settings, settings.marc.experiment)
    with mlflow.start_run(run_name="compression-eval"):
        mlflow.set_tag("kind", "compression-eval")
        mlflow.log_params({"seeds": cfg.seeds, "out_dim": cfg.out_dim, "best_layer": result.best_layer})
        for e in result.table:
            mlflow.log_metric(f"test_auc.{e.method}.{e.dtype}", e.metrics["auc_all"].mean)
        for e in result.layer_raw + result.layer_pca:
            mlflow.log_metric(f"test_auc_by_layer.{e.method}", e.metrics["auc_all"].mean, step=e.layer)
        for path in [out / "marc_results.json", out / "marc_results.md", *pngs]:
            mlflow.log_artifact(str(path))
    return result


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="eval-compression")
    config_args(parser)
    sweep_args(parser)
    args = parser.parse_args(argv)
    cfg = sweep_config(args.seeds, args.layers, args.marc_layers)
    return run_in_process(
        "eval-compression", args.config, args.overrides, lambda s: run(None, s, cfg, args.out)
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.eval_compression import main as package_main

    sys.exit(package_main())
