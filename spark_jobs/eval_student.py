"""Student vs teacher: the CTR probe's AUC on features from each, and each encoder's throughput.

    llmfeat encode --entity items --set data_dir=<student lake> --set encode.model=<folder> \
        --set encode.layers=[<N>]
    llmfeat eval-student --student <folder> --student-data <student lake> [--out results.json]

Features: the item vectors of `items_repr` (teacher rows at `slmrec.layer` and, when present, at the
teacher's own layer N, from <data_dir>; student rows at layer N from the student's lake), judged by the fixed
probe of the evaluation protocol (models/evaluation/probe_eval.py through models/marc/sweep.Evaluator: ID
model on train, probe on valid, test AUC with intervals). Item vectors only, with no user vector (users' long
texts cost minutes per hundred on CPU); the ID-only probe is the reference. AUC intervals and the paired
differences (on the same test rows) resample users with all their rows, as the protocol asks. Throughput:
the executor's encoder (models/encoder.LayerEncoder) on the same item and user texts, teacher stopping at its
tapped layer, student at its last, measured alternately, best of `repeats`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmfeat.job_args import student_args
from llmfeat.models.encoder import EncoderConfig, load_encoder, resolve_model
from llmfeat.reprs import ReprError, layer_matrix, repr_table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings

log = logging.getLogger("llmfeat.slmrec")


@dataclass(frozen=True)
class Throughput:
    encoder: str
    layer: int
    workload: str
    texts: int
    tokens: int
    seconds: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    def __str__(self) -> str:
        return (f"{self.encoder:<44} layer {self.layer:>2}  {self.workload:<6} "
                f"{self.texts_per_s:8.1f} texts/s {self.tokens / self.seconds:9.0f} tokens/s")  # fmt: skip


def measure_throughput(
    models: dict[str, tuple[Any, int]], workloads: dict[str, list[str]], settings: Settings, repeats: int = 2
) -> list[Throughput]:
    """models: name -> (ModelSource, layer). Each encoder is loaded once; runs alternate between them."""
    e = settings.encode
    encoders = {
        name: load_encoder(src, EncoderConfig(layers=(layer,), pooling=e.pooling, normalize=e.normalize,
                                              max_length=e.max_length, token_budget=e.token_budget),
                           torch.device("cpu"))
        for name, (src, layer) in models.items()
    }  # fmt: skip
    best: dict[tuple[str, str], Throughput] = {}
    for _ in range(repeats):
        for workload, texts in workloads.items():
            for name, enc in encoders.items():
                started = time.perf_counter()
                out = enc.encode(texts)
                t = Throughput(name, models[name][1], workload, len(texts), out.tokens,
                               time.perf_counter() - started)  # fmt: skip
                key = (name, workload)
                if key not in best or t.seconds < best[key].seconds:
                    best[key] = t
    return list(best.values())


def item_vectors(delta_root: Path, layer: int, keys: np.ndarray, encoder_id: str | None = None) -> np.ndarray:
    import pyarrow.compute as pc

    from llmfeat.delta_io import RustDelta
    from llmfeat.sample import Sample, SampleConf

    table = Sample(RustDelta(delta_root), SampleConf()).read(repr_table("items"), item_id=keys)
    if encoder_id is not None:
        table = table.filter(pc.equal(table["encoder_id"], encoder_id))
    return layer_matrix(table, "items", layer, keys, name=f"{delta_root}/{repr_table('items')}")


def user_resamples(users: np.ndarray, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """`n_boot` draws of row indices: users drawn with replacement, each bringing all its rows."""
    _, group = np.unique(users, return_inverse=True)
    order = np.argsort(group, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(group))]
    members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            for _ in range(n_boot)]  # fmt: skip


def user_clustered_auc(
    y: np.ndarray, users: np.ndarray, preds: np.ndarray, base: np.ndarray | None = None, n_boot: int = 500
) -> list[float]:
    """Seed-averaged AUC of preds (S, N) (minus that of `base` (S, N), paired, when given) with a 95%
    interval over user resamples -> [mean, low, high]."""
    from llmfeat.models.evaluation.metrics import auc

    def stat(idx: np.ndarray) -> float:
        value = float(np.mean([auc(y[idx], p[idx]) for p in preds]))
        return value - float(np.mean([auc(y[idx], p[idx]) for p in base])) if base is not None else value

    boot = np.array([stat(idx) for idx in user_resamples(users, n_boot)])
    boot = boot[~np.isnan(boot)]
    return [stat(np.arange(len(y))), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def probe_table(
    settings: Settings, student: Path, student_data: Path, seeds: int, pca_dim: int = 64
) -> dict[str, Any]:
    """Probe test AUC (all / warm / cold, intervals) for ID only, teacher layers and the student."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.models.ctr.data import ctr_arrays
    from llmfeat.models.evaluation.probe_eval import fit_id_model
    from llmfeat.models.marc.baselines import pca
    from llmfeat.models.marc.sweep import Evaluator, SweepConfig
    from llmfeat.sample import Sample

    a = ctr_arrays(*Sample(RustDelta(settings.delta_root), settings.sample).ctr_tables())
    meta = json.loads((student / "slmrec.json").read_text())
    n, m = meta["student"]["student_layers"], meta["student"]["teacher_layer"]
    no_users = np.zeros((len(a.user_keys), 0), np.float32)
    variants: dict[str, tuple[Path, int, str | None]] = {"teacher": (settings.delta_root, m, None)}
    try:
        item_vectors(settings.delta_root, n, a.item_keys)
        variants["teacher-truncated"] = (settings.delta_root, n, None)
    except ReprError:
        log.info("no teacher layer %d in items_repr: the truncated-teacher reference is skipped", n)
    variants["student"] = (student_data / "delta", n, student.name)
    sweep = SweepConfig(seeds=seeds)
    ev = Evaluator(a, sweep, [fit_id_model(a, sweep.protocol, seed) for seed in range(seeds)])
    entries = {"id-only": ev.evaluate("id-only", 0, (no_users, np.zeros((len(a.item_keys), 0), np.float32)))}
    for name, (root, layer, enc_id) in variants.items():
        x = item_vectors(Path(root), layer, a.item_keys, enc_id)
        entries[name] = ev.evaluate(name, layer, (no_users, x))
        if pca_dim:  # the protocol's compression reference: PCA fitted on the items' states (label-free)
            entries[f"{name}+pca{pca_dim}"] = ev.evaluate(
                f"{name}+pca", layer, (no_users, pca(x, pca_dim)(x))
            )
    test = a.rows("test")
    y, users = a.label[test], a.user_idx[test]
    parts = {"all": np.ones(len(test), bool), "warm": a.warm[test], "cold": ~a.warm[test]}
    out: dict[str, Any] = {
        "entries": {},
        "differences": {},
        "intervals": "users resampled (cluster bootstrap)",
    }
    for name, e in entries.items():
        row = e.row()
        for part, m in parts.items():  # the same means, intervals over users
            row[f"auc_{part}"] = user_clustered_auc(y[m], users[m], e.preds[:, m])
        out["entries"][name] = row
    for name in entries:
        ref = f"teacher+pca{pca_dim}" if "+pca" in name else "teacher"
        if name != ref:
            d = user_clustered_auc(y, users, entries[name].preds, entries[ref].preds, n_boot=1000)
            out["differences"][f"{name} - {ref}"] = d
    return out


def workload_texts(settings: Settings, n_items: int = 64, n_users: int = 16) -> dict[str, list[str]]:
    from llmfeat.spark_jobs.distil_student import distillation_texts

    cfg = settings.slmrec.model_copy(update={"texts_per_entity": max(n_items, n_users), "holdout": 0})
    texts = distillation_texts(settings.model_copy(update={"slmrec": cfg}))
    pick = {"items": n_items, "users": n_users}
    return {
        e: [t for t, x in zip(texts.texts, texts.entity, strict=True) if x == e][:k] for e, k in pick.items()
    }


def evaluate(settings: Settings, student: Path, student_data: Path, seeds: int = 3) -> dict[str, Any]:
    meta = json.loads((student / "slmrec.json").read_text())
    teacher = resolve_model(settings.slmrec.teacher, settings.encode.cache_dir)
    models = {
        teacher.encoder_id: (teacher, meta["student"]["teacher_layer"]),
        student.name: (
            resolve_model(str(student), settings.encode.cache_dir),
            meta["student"]["student_layers"],
        ),
    }
    speed = measure_throughput(models, workload_texts(settings), settings)
    for t in speed:
        log.info("%s", t)
    result = probe_table(settings, student, student_data, seeds)
    result["throughput_cpu"] = [
        {"encoder": t.encoder, "layer": t.layer, "workload": t.workload, "texts": t.texts, "tokens": t.tokens,
         "seconds": t.seconds, "texts_per_s": t.texts_per_s, "tokens_per_s": t.tokens / t.seconds}
        for t in speed
    ]  # fmt: skip
    result["student"] = meta
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{'features (items only)':<22}{'test AUC all [95%]':<28}{'warm':<28}{'cold':<28}"]
    for name, row in result["entries"].items():
        cells = [
            f"{row[k][0]:.4f} [{row[k][1]:.4f}, {row[k][2]:.4f}]" for k in ("auc_all", "auc_warm", "auc_cold")
        ]
        lines.append(f"{name:<22}" + "".join(f"{c:<28}" for c in cells))
    for name, (mean, low, high) in result["differences"].items():
        lines.append(f"AUC {name}: {mean:+.4f} [{low:+.4f}, {high:+.4f}]")
    for t in result["throughput_cpu"]:
        lines.append(f"CPU {t['encoder']:<44} layer {t['layer']:>2} {t['workload']:<6} "
                     f"{t['texts_per_s']:7.1f} texts/s {t['tokens_per_s']:8.0f} tokens/s")  # fmt: skip
    return "\n".join(lines)


def run(
    spark: SparkSession | None, settings: Settings, student: Path, student_data: Path, out: Path | None = None
) -> dict[str, Any]:
    """Probe AUC and throughput of the student against the teacher (no Spark), printed, logged to MLflow and
    written to `out` as JSON."""
    import mlflow

    from llmfeat.registry import use_tracking

    result = evaluate(settings, student, student_data)
    print(format_result(result), flush=True)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str))
    use_tracking(settings, settings.slmrec.experiment)
    with mlflow.start_run(run_name=f"eval-{student.name}"):
        mlflow.set_tags({"kind": "slmrec-eval", "student.encoder_id": student.name})
        for name, row in result["entries"].items():
            for part in ("all", "warm", "cold"):
                mlflow.log_metric(f"auc_{part}_{name}", row[f"auc_{part}"][0])
        for t in result["throughput_cpu"]:
            mlflow.log_metric(f"cpu_texts_per_s_{t['workload']}_{t['encoder'][:40]}", t["texts_per_s"])
        mlflow.log_dict(result, "student_eval.json")
    return result


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="eval-student")
    config_args(parser)
    student_args(parser)
    args = parser.parse_args(argv)
    body = lambda s: run(None, s, args.student, args.student_data, args.out)  # noqa: E731
    return run_in_process("eval-student", args.config, args.overrides, body)


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.eval_student import main as package_main

    sys.exit(package_main())
