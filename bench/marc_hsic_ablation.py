"""Does MARC's independence term help? The same point-in-time fits with its weight at 0.1 and at 0.

    python bench/marc_hsic_ablation.py --data-dir data/local --seeds 3 --out docs \
        [--set marc.max_epochs=4 --set marc.max_fit_rows=12000 ...]

MARC's loss is BCE - keep_weight * nHSIC(x, z) + indep_weight * nHSIC(z, t) (models/marc/model.py). Each
variant is fitted like `llmfeat train-compressor` (point-in-time rows, MARC's fit period, early stopping on
the next period; layer `marc.layer`) with the same seeds, and judged two ways on the test split:
- MARC's own click head on its compressed vectors (what the compressor alone predicts);
- the CTR ablation's "+ both" arm: the id model of the same seed plus the residual branch over these vectors.
Intervals resample users; differences are paired against the first variant or the id model (CTR).
Results: <out>/marc_hsic_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llmfeat.config import Settings, load_settings
from llmfeat.models.ctr.data import CtrArrays
from llmfeat.models.ctr.train import fit_model, predict
from llmfeat.models.evaluation.ab_stats import paired_differences
from llmfeat.models.evaluation.ctr_eval import metric_intervals
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.models.marc.train import compress, fit_marc, marc_periods
from llmfeat.reprs import layer_matrix, repr_table
from llmfeat.spark_jobs.ctr_ablation import DIM, Rows, fit_arm, int8_round_trip, load_rows
from llmfeat.spark_jobs.train_compressor import marc_config, train_config

log = logging.getLogger("marc_hsic_ablation")
VARIANTS: dict[str, dict[str, float]] = {
    "indep_weight 0.1 (the paper's term)": {"indep_weight": 0.1},
    "indep_weight 0": {"indep_weight": 0.0},
}


def fit_variant(
    settings: Settings, rows: Rows, xu: np.ndarray, xi: np.ndarray, seed: int, update: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """-> MARC head's test logits (N_test,), user and item vectors (N, 64), best early-stopping AUC."""
    f = rows.frame
    ts = pd.to_datetime(f["event_timestamp"], utc=True).astype("int64").to_numpy() // 1000
    periods = marc_periods(ts, f["split"].to_numpy(), settings.marc.fit_frac, settings.marc.stop_frac)
    a = CtrArrays(
        rows.snapshot_keys, rows.item_keys, rows.snapshot_idx, rows.item_idx, f["label"].to_numpy(np.float32),
        f["split"].to_numpy(), ts, np.zeros((len(f), 0), np.float32), rows.slices["warm users"],
    )  # fmt: skip
    cfg = settings.marc.model_copy(update=update | {"seed": seed})
    fit = fit_marc(
        a, xu, xi, marc_config(cfg, xi.shape[1]), train_config(cfg),
        fit_rows=np.flatnonzero(periods["marc_fit"]), stop_rows=np.flatnonzero(periods["marc_stop"]),
        max_fit_rows=cfg.max_fit_rows,
    )  # fmt: skip
    test = np.flatnonzero(rows.masks["test"])
    with torch.no_grad():
        head = fit.model(
            torch.from_numpy(xu[rows.snapshot_idx[test]]), torch.from_numpy(xi[rows.item_idx[test]])
        ).numpy()
    zu = int8_round_trip(compress(fit.compressor("users"), xu))[rows.snapshot_idx]
    zi = int8_round_trip(compress(fit.compressor("items"), xi))[rows.item_idx]
    return head, zu, zi, float(fit.history.best_score)


def interval(v: Interval) -> list[float]:
    return [v.mean, v.low, v.high]


def run(data_dir: str, seeds: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    from llmfeat.delta_io import open_tables

    started = time.monotonic()
    settings = load_settings("local", [f"data_dir={data_dir}", *overrides])
    rows = load_rows(settings, None)
    tables = open_tables(settings)
    layer = settings.marc.layer
    xi = layer_matrix(tables.read_arrow(repr_table("items")), "items", layer, rows.item_keys)
    xu = layer_matrix(
        tables.read_arrow(repr_table("user_snapshots")), "user_snapshots", layer, rows.snapshot_keys
    )
    f = rows.frame
    test = rows.masks["test"]
    y, users = f["label"].to_numpy(float), f["user_id"].to_numpy()
    heads: dict[str, list[np.ndarray]] = {}
    ctr: dict[str, list[np.ndarray]] = {"ids": []}
    stop: dict[str, list[float]] = {}
    for seed in range(seeds):
        cfg = settings.ctr.model_copy(update={"seed": seed})
        ids = f.drop(columns=["user_vector", "item_vector"])
        champion, encoder = fit_model(ids, rows.masks, False, cfg)
        ctr["ids"].append(predict(champion, encoder, ids)[test])
        state = dict(champion.state_dict())
        for name, update in VARIANTS.items():
            log.info("seed %d: MARC %s", seed, name)
            head, zu, zi, best = fit_variant(settings, rows, xu, xi, seed, update)
            heads.setdefault(name, []).append(head)
            stop.setdefault(name, []).append(best)
            ctr.setdefault(name, []).append(fit_arm(settings, rows, (zu, zi), seed, state)[test])
    mean = {k: np.mean(v, axis=0) for k, v in heads.items()}
    cmean = {k: np.mean(v, axis=0) for k, v in ctr.items()}
    n_boot = settings.ctr.n_boot
    yt, ut = y[test], users[test]
    first = next(iter(VARIANTS))
    result: dict[str, Any] = {"layer": layer, "dim": DIM, "seeds": seeds, "test_rows": int(test.sum()),
                              "test_users": int(len(set(ut))), "variants": {}}  # fmt: skip
    for name in VARIANTS:
        entry = {
            "marc_stop_auc": float(np.mean(stop[name])),
            "head_test_auc": interval(metric_intervals(yt, mean[name], ut, n_boot)["auc"]),
            "ctr_test_auc": interval(metric_intervals(yt, cmean[name], ut, n_boot)["auc"]),
            "ctr_minus_ids": interval(paired_differences(yt, cmean["ids"], cmean[name], ut, n_boot)["auc"]),
        }
        if name != first:
            d = paired_differences(yt, mean[first], mean[name], ut, n_boot)["auc"]
            entry["head_minus_first"] = interval(d)
            d = paired_differences(yt, cmean[first], cmean[name], ut, n_boot)["auc"]
            entry["ctr_minus_first"] = interval(d)
        result["variants"][name] = entry
    result["ids_test_auc"] = interval(metric_intervals(yt, cmean["ids"], ut, n_boot)["auc"])
    result["seconds"] = round(time.monotonic() - started)
    result["marc"] = settings.marc.model_dump()
    out.mkdir(parents=True, exist_ok=True)
    (out / "marc_hsic_ablation.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data/local")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(args.data_dir, args.seeds, args.out, args.overrides), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
