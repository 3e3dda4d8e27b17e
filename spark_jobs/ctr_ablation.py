"""The CTR ablation: what LLM features add to the id model, on the same point-in-time rows, by slice.

    llmfeat ctr-ablation [--seeds 3] [--layers 8,15] [--item-layers 22,30] [--out docs]
    spark-submit spark_jobs/ctr_ablation.py --config local --seeds 3

Every arm is the same id model (ids, item metadata, point-in-time counters: the champion) plus a residual
branch fitted on top of it (id part frozen, zero at start, regularised, on the rows after MARC's period),
so arms differ only in the vectors the branch sees:

- ids: the id model alone;
- + item (MARC), + user (MARC), + both (MARC): the published views, joined by Feast per row;
- + both (PCA): PCA of the same tapped layer at the same bytes (64 x int8);
- history arms over the same point-in-time history (the user's earlier days, liked and disliked items):
  genre multi-hots (no LLM), item-id embeddings of the id model (no LLM), MARC item vectors (LLM);
- the layer curve: user snapshots and items at each tapped layer in `--layers` (items only for
  `--item-layers`), PCA and MARC (fitted once per layer on point-in-time rows, MARC's fitting period) at
  equal bytes.

Metrics on the test split, whole and by slice (users with history on an earlier day, users new that day,
warm users = train-period history), averaged over seeds; 95% intervals resample users; differences against
the id model are paired over the same user resamples. Results: <out>/ctr_results.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.config import Settings
from llmfeat.models.evaluation.ab_stats import paired_differences
from llmfeat.models.evaluation.ctr_eval import metric_intervals
from llmfeat.reprs import dequantise_int8, layer_matrix, parse_snapshot_id, quantise_int8, repr_table
from llmfeat.sample import Sample

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("llmfeat.ablation")
DIM = 64  # the published vectors' width: every arm compares at 64 x int8


@dataclass
class Rows:
    """The point-in-time frame and the arrays the arms are built from (N rows)."""

    frame: pd.DataFrame
    masks: dict[str, np.ndarray]
    residual_rows: np.ndarray
    snapshot_idx: np.ndarray  # (N,) each row's user snapshot (index into snapshot_keys)
    snapshot_keys: np.ndarray  # (S,)
    item_idx: np.ndarray  # (N,) into item_keys
    item_keys: np.ndarray  # (I,)
    slices: dict[str, np.ndarray]  # name -> (N,) bool over all rows


def load_rows(settings: Settings, spark: SparkSession | None) -> Rows:
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store
    from llmfeat.models.ctr.data import ctr_arrays, point_in_time
    from llmfeat.models.ctr.train import after_marc
    from llmfeat.spark_jobs.training_set import build_frame, split_masks

    tables = open_tables(settings, spark)
    frame, _ = build_frame(settings, tables, open_store(settings), [settings.ctr.llm_feature_service])
    masks = split_masks(frame, settings.ctr.stop_frac)
    sample = Sample(tables, settings.sample)  # the same users as build_frame's
    inter, users_table, items = sample.ctr_tables()
    a = ctr_arrays(inter, users_table, items)
    snapshot_ids = set(sample.read(repr_table("user_snapshots"), ["snapshot_id"])["snapshot_id"].to_pylist())
    sampled = {str(u) for u in a.user_keys}
    parsed = [(k, *parse_snapshot_id(k)) for k in sorted(snapshot_ids)]
    parsed = [p for p in parsed if p[1] in sampled]  # the snapshots of the sampled users
    keys = np.array([k for k, _, _ in parsed], dtype=object)
    users = np.array([u for _, u, _ in parsed], dtype=object)
    micros = np.array([int(t.timestamp() * 1_000_000) for _, _, t in parsed], dtype=np.int64)
    pit = point_in_time(a, keys, users, micros)
    # the interactions table and the frame hold the same rows; align by (user, item, time)
    order = _align(frame, inter.to_pandas())
    earlier = frame["user_impressions"].fillna(0).to_numpy() > 0
    warm = frame["user_id"].isin(set(frame.loc[masks["train"], "user_id"])).to_numpy()
    slices = {"all": np.ones(len(frame), bool), "earlier-day history": earlier, "new that day": ~earlier}
    slices["warm users"] = warm
    residual_rows = after_marc(frame, settings.marc)
    return Rows(
        frame, masks, residual_rows, pit.user_idx[order], keys, a.item_idx[order], a.item_keys, slices
    )  # fmt: skip


def _align(frame: pd.DataFrame, inter: pd.DataFrame) -> np.ndarray:
    """For each frame row, its row in the interactions table."""
    key = ["user_id", "item_id", "event_timestamp"]
    left = frame[key].assign(event_timestamp=pd.to_datetime(frame["event_timestamp"], utc=True))
    right = inter[key].assign(event_timestamp=pd.to_datetime(inter["event_timestamp"], utc=True))
    right = right.astype({"user_id": str, "item_id": str}).reset_index(names="_row")
    merged = left.merge(right, on=key, how="left", validate="one_to_one")
    return merged["_row"].to_numpy(np.int64)


def int8_round_trip(z: np.ndarray) -> np.ndarray:

    return dequantise_int8(*quantise_int8(z.astype(np.float32)))


def layer_arms(settings: Settings, rows: Rows, layer: int, users_too: bool) -> dict[str, tuple[Any, Any]]:
    """PCA and MARC at one tapped layer: (user vectors (N, 64) or None, item vectors (N, 64)) per arm."""
    from llmfeat.delta_io import open_tables
    from llmfeat.models.ctr.data import CtrArrays
    from llmfeat.models.marc.baselines import pca
    from llmfeat.models.marc.train import compress, fit_marc, marc_periods
    from llmfeat.spark_jobs.train_compressor import marc_config, train_config

    sample = Sample(open_tables(settings), settings.sample)
    xi = layer_matrix(
        sample.read(repr_table("items"), item_id=rows.item_keys), "items", layer, rows.item_keys
    )
    snapshots = (
        sample.read(repr_table("user_snapshots"), snapshot_id=rows.snapshot_keys) if users_too else None
    )
    xu = (
        layer_matrix(snapshots, "user_snapshots", layer, rows.snapshot_keys)
        if users_too
        else np.zeros((len(rows.snapshot_keys), xi.shape[1]), np.float32)
    )
    f = rows.frame
    ts = pd.to_datetime(f["event_timestamp"], utc=True).astype("int64").to_numpy() // 1000
    periods = marc_periods(ts, f["split"].to_numpy(), settings.marc.fit_frac, settings.marc.stop_frac)
    fit = periods["marc_fit"]
    arms: dict[str, tuple[Any, Any]] = {}
    p_items = pca(xi[np.unique(rows.item_idx[fit])], DIM)
    p_users = pca(xu[np.unique(rows.snapshot_idx[fit])], DIM) if users_too else None
    zi = int8_round_trip(p_items(xi))[rows.item_idx]
    zu = int8_round_trip(p_users(xu))[rows.snapshot_idx] if p_users else None
    arms[f"layer {layer}: PCA"] = (zu, zi)
    a = CtrArrays(
        rows.snapshot_keys, rows.item_keys, rows.snapshot_idx, rows.item_idx, f["label"].to_numpy(np.float32),
        f["split"].to_numpy(), ts, np.zeros((len(f), 0), np.float32), rows.slices["warm users"],
    )  # fmt: skip
    cfg = settings.marc
    marc = fit_marc(
        a, xu, xi, marc_config(cfg, xi.shape[1]), train_config(cfg),
        fit_rows=np.flatnonzero(fit), stop_rows=np.flatnonzero(periods["marc_stop"]),
        max_fit_rows=cfg.max_fit_rows,
    )  # fmt: skip
    zi = int8_round_trip(compress(marc.compressor("items"), xi))[rows.item_idx]
    zu = int8_round_trip(compress(marc.compressor("users"), xu))[rows.snapshot_idx] if users_too else None
    arms[f"layer {layer}: MARC"] = (zu, zi)
    return arms


def history_arms(
    rows: Rows, id_item_emb: np.ndarray, item_emb_index: np.ndarray
) -> dict[str, tuple[Any, Any]]:
    """Non-LLM and LLM history arms over the same point-in-time history."""
    from llmfeat.feast_join import vector_matrix
    from llmfeat.models.ctr.history import history_means

    f = rows.frame
    users = pd.factorize(f["user_id"])[0]
    days = (pd.to_datetime(f["event_timestamp"], utc=True).astype("int64") // (86400 * 10**9)).to_numpy()
    labels = f["label"].to_numpy()
    genres = sorted({g for s in f["genres"].dropna() for g in str(s).split("|") if g})
    item_genres = np.zeros((len(rows.item_keys), len(genres)), np.float32)
    index = {g: i for i, g in enumerate(genres)}
    for idx, value in zip(rows.item_idx, f["genres"], strict=True):
        for g in str(value).split("|") if isinstance(value, str) else ():
            item_genres[idx, index[g]] = 1.0
    llm_items, _ = vector_matrix(f, "item_vector", DIM)  # (N, 64): each row's item, as published
    item_llm = np.zeros((len(rows.item_keys), DIM), np.float32)
    item_llm[rows.item_idx] = llm_items
    arms: dict[str, tuple[Any, Any]] = {}
    for name, per_item in (
        ("history: genres (no LLM)", item_genres),
        ("history: item-id embeddings (no LLM)", id_item_emb[item_emb_index]),
        ("history: LLM item vectors (MARC)", item_llm),
    ):
        hist = history_means(users, rows.item_idx, days, labels, per_item)
        arms[name] = (hist, per_item[rows.item_idx])
    return arms


def fit_arm(settings: Settings, rows: Rows, vectors: tuple[Any, Any], seed: int, id_state: Any) -> np.ndarray:
    from llmfeat.models.ctr.train import fit_model, predict

    user, item = vectors
    n = len(rows.frame)
    frame = rows.frame.assign(
        user_vector=list(user) if user is not None else [None] * n,
        item_vector=list(item) if item is not None else [None] * n,
    )
    if user is None:  # an arm without user vectors: a constant placeholder the encoder standardises to 0
        frame["user_vector"] = [np.zeros(1, np.float32)] * n
    if item is None:
        frame["item_vector"] = [np.zeros(1, np.float32)] * n
    cfg = settings.ctr.model_copy(update={"seed": seed})
    model, encoder = fit_model(
        frame, rows.masks, True, cfg, residual_rows=rows.residual_rows, id_state=id_state
    )
    return predict(model, encoder, frame)


def run(
    spark: SparkSession | None,
    settings: Settings,
    seeds: int = 3,
    layers: Sequence[int] = (15,),
    item_layers: Sequence[int] = (),
    out: Path = Path("docs"),
) -> dict[str, Any]:
    """Every arm over `seeds` seeds, the layer curve over `layers` and `item_layers` (items only); writes
    <out>/ctr_results.{json,md} after each seed. Without `spark`, Delta is read with delta-rs."""
    from llmfeat.feast_join import vector_matrix
    from llmfeat.models.ctr.train import fit_model, predict

    started = time.monotonic()
    rows = load_rows(settings, spark)
    f = rows.frame
    published = tuple(vector_matrix(f, c, DIM)[0] for c in ("user_vector", "item_vector"))
    preds: dict[str, list[np.ndarray]] = {}
    # The layer curve's compressors are fitted once, and its arms trained with the first seed only (the
    # main arms get every seed): a CPU budget choice, stated in the table.
    curve: dict[str, tuple[Any, Any]] = {}
    for layer in layers:
        curve |= layer_arms(settings, rows, layer, True)
    for layer in item_layers:
        curve |= {f"{k} (items only)": v for k, v in layer_arms(settings, rows, layer, False).items()}
    results: dict[str, Any] = {}
    for seed in range(seeds):
        cfg = settings.ctr.model_copy(update={"seed": seed})
        ids = f.drop(columns=["user_vector", "item_vector"])
        champion, encoder = fit_model(ids, rows.masks, False, cfg)
        preds.setdefault("ids", []).append(predict(champion, encoder, ids))
        state = {k: v for k, v in champion.state_dict().items()}
        emb = champion.fields.item_emb.weight.detach().numpy()
        emb_index = np.array([encoder.item_ids.index(k) + 1 if k in encoder.item_ids else 0
                              for k in rows.item_keys])  # fmt: skip
        arms: dict[str, tuple[Any, Any]] = {
            "+ item (MARC)": (None, published[1]),
            "+ user (MARC)": (published[0], None),
            "+ both (MARC)": (published[0], published[1]),
        }
        arms |= history_arms(rows, emb, emb_index) | (curve if seed == 0 else {})
        for name, vectors in arms.items():
            log.info("seed %d: %s", seed, name)
            preds.setdefault(name, []).append(fit_arm(settings, rows, vectors, seed, state))
        # written after every seed: a long run leaves its results so far
        results = summarise(rows, preds, settings.ctr.n_boot)
        results["seeds"] = {k: len(v) for k, v in preds.items()}
        results["seconds"] = time.monotonic() - started
        out.mkdir(parents=True, exist_ok=True)
        (out / "ctr_results.json").write_text(json.dumps(results, indent=1))
        (out / "ctr_results.md").write_text(markdown(results))
    return results


def summarise(rows: Rows, preds: dict[str, list[np.ndarray]], n_boot: int) -> dict[str, Any]:
    """Seed-mean predictions per arm; each arm's difference is taken against the id model averaged over the
    same seeds (an arm trained with the first seed only is compared with the first seed's id model)."""
    p = {k: np.mean(v, axis=0) for k, v in preds.items()}
    f = rows.frame
    y, users = f["label"].to_numpy(float), f["user_id"].to_numpy()
    out: dict[str, Any] = {"n_boot": n_boot, "arms": {}, "slices": {}}
    test = rows.masks["test"]
    for slice_name, m in rows.slices.items():
        sel = test & m
        out["slices"][slice_name] = {"rows": int(sel.sum()), "users": int(len(set(users[sel])))}
    for name, pred in p.items():
        arm: dict[str, Any] = {}
        for slice_name, m in rows.slices.items():
            sel = test & m
            if sel.sum() < 2:
                continue
            metrics = metric_intervals(y[sel], pred[sel], users[sel], n_boot)
            entry = {k: [v.mean, v.low, v.high] for k, v in metrics.items()}
            if name != "ids":
                base = np.mean(preds["ids"][: len(preds[name])], axis=0)
                diff = paired_differences(y[sel], base[sel], pred[sel], users[sel], n_boot)
                entry |= {f"diff_{k}": [v.mean, v.low, v.high] for k, v in diff.items()}
            arm[slice_name] = entry
        valid = rows.masks["valid"]
        arm["valid_auc"] = float(metric_intervals(y[valid], pred[valid], users[valid], 0)["auc"].mean)
        out["arms"][name] = arm
    return out


def markdown(r: dict[str, Any]) -> str:
    slices = list(r["slices"])
    head = "| arm | seeds | valid AUC | " + " | ".join(f"test AUC {s}" for s in slices)
    head += " | AUC - ids, all [95%] | AUC - ids, earlier-day history [95%] | LogLoss - ids, all |"
    lines = [head, "|" + "---|" * (len(slices) + 6)]
    for name, arm in r["arms"].items():
        cells = [f"{arm[s]['auc'][0]:.4f}" if s in arm else "-" for s in slices]
        diffs = []
        for s, key in (("all", "diff_auc"), ("earlier-day history", "diff_auc"), ("all", "diff_logloss")):
            d = arm.get(s, {}).get(key)
            diffs.append(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" if d else "-")
        seeds = r["seeds"][name]
        lines.append(f"| {name} | {seeds} | {arm['valid_auc']:.4f} | " + " | ".join(cells + diffs) + " |")
    sizes = ", ".join(f"{s}: {v['rows']:,} rows / {v['users']} users" for s, v in r["slices"].items())
    lines.append(
        f"\nTest slices: {sizes}. Predictions averaged over the seeds shown; intervals resample users."
    )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", default="15", help="layers with user snapshots and items (comma list)")
    parser.add_argument("--item-layers", default="", help="layers with items only (comma list)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where ctr_results.{json,md} go")


def command(args: argparse.Namespace) -> int:
    from llmfeat.runner import command_settings

    settings = command_settings("ctr-ablation", args.config, args.overrides)
    if settings is None:
        return 2
    layers = [int(x) for x in args.layers.split(",") if x]
    item_layers = [int(x) for x in args.item_layers.split(",") if x]
    print(markdown(run(None, settings, args.seeds, layers, item_layers, args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args

    parser = argparse.ArgumentParser(prog="llmfeat ctr-ablation")
    config_args(parser)
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy, as the CLI does.
    from llmfeat.spark_jobs.ctr_ablation import main as package_main

    sys.exit(package_main())
