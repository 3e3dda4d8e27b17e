"""Does BAHE's user encoder gain from more pretrained blocks above the split? bahe.deep_layers 2, 4 and 8.

Each variant trains BAHE on the lake's behaviour table (`llmfeat bahe encode` first) in a fresh process, with
real SmolLM2 weights, the same seed and the same point-in-time rows (spark_jobs/bahe.py), and its user
vectors go through the fixed probe of `llmfeat bahe evaluate` (ID model + the user vector, fitted on valid,
tested on test; docs/methods.md). The difference against 2 blocks is paired over the same test rows with users
resampled (the bootstrap of models/evaluation/ab_stats.py).

    .venv/bin/python bench/bahe_deep_layers.py --deep 2 4 8 --out docs/bahe_deep_layers.json
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np


def main() -> None:
    from llmfeat.config import load_settings
    from llmfeat.delta_io import open_tables
    from llmfeat.models.ctr.data import ctr_arrays
    from llmfeat.models.evaluation.ab_stats import paired_differences
    from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_id_model, fit_probe, split_metrics
    from llmfeat.sample import Sample
    from llmfeat.spark_jobs.bahe_eval import in_process, train_bahe_child

    ap = argparse.ArgumentParser()
    ap.add_argument("--deep", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds")
    ap.add_argument("--config", default="local")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default="docs/bahe_deep_layers.json")
    args = ap.parse_args()

    base = load_settings(args.config, args.overrides)
    a = ctr_arrays(*Sample(open_tables(base), base.sample).ctr_tables())
    cfg = ProtocolConfig()
    ids = [fit_id_model(a, cfg, seed=s) for s in range(args.seeds)]
    no_items = np.zeros((len(a.item_keys), 0), np.float32)
    no_users = np.zeros((len(a.user_keys), 0), np.float32)
    id_preds = np.stack(
        [fit_probe(a, ids[s], no_users, no_items, cfg, seed=s).test_pred for s in range(args.seeds)]
    )
    id_only = {k: asdict(v) for k, v in split_metrics(a, id_preds, cfg.n_boot).items()}
    runs, scores = {}, {}
    for deep in args.deep:
        settings = base.model_copy(update={"bahe": base.bahe.model_copy(update={"deep_layers": deep})})
        trained, seconds, peak_mb = in_process(train_bahe_child, settings.model_dump(mode="json"))
        vectors = trained["vectors"]
        preds = np.stack(
            [fit_probe(a, ids[s], vectors, no_items, cfg, seed=s).test_pred for s in range(args.seeds)]
        )
        scores[deep] = preds.mean(axis=0)  # (test rows,): the probe's prediction, mean over its seeds
        runs[deep] = {
            "quality": {k: asdict(v) for k, v in split_metrics(a, preds, cfg.n_boot).items()},
            "bahe_head_valid_auc": trained["valid_auc"],
            "best_epoch": trained["best_epoch"],
            "epochs": trained["epochs"],
            "trainable_parameters": trained["trainable_parameters"],
            "train_seconds": round(seconds, 1),
            "peak_rss_mb": round(peak_mb),
        }
        print(deep, json.dumps(runs[deep]["quality"]["auc_all"]), runs[deep]["train_seconds"], flush=True)
    test = a.rows("test")
    first = args.deep[0]
    for deep in args.deep[1:]:
        diff = paired_differences(a.label[test], scores[first], scores[deep], a.user_idx[test])
        runs[deep][f"minus_{first}_blocks"] = {k: asdict(v) for k, v in diff.items()}
    out = {
        "machine": f"{platform.node()}, {__import__('os').cpu_count()} CPUs",
        "command": "bench/bahe_deep_layers.py " + " ".join(f"--deep {d}" for d in args.deep),
        "split_layer": base.bahe.layer,
        "test_rows": len(test),
        "id_only": id_only,
        "runs": {str(k): v for k, v in runs.items()},
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=_plain) + "\n")
    print(json.dumps(out, indent=1, default=_plain))


def _plain(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else str(v)


if __name__ == "__main__":
    main()
