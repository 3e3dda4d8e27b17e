"""The CTR ablation: where LLM features pay, under three freshness protocols, for either model family.

    llmfeat ctr-ablation [--family lightgbm | dnn] [--protocols daily,fresh,cold_items] [--cold-items 0.2]
                         [--layers 8,15,22,30] [--seeds 5] [--out docs]
    spark-submit spark_jobs/ctr_ablation.py --config local --family lightgbm

Protocols (every feature strictly before its row; models/ctr/history.py computes them in-process from the
interactions, with the same rules as the daily counters and the event-time state of models/ctr/state.py):
- daily: counters and histories of the user's and item's earlier days;
- fresh: of strictly earlier events (the state pushed at every event), daily counters kept beside them;
- cold_items: a seeded `--cold-items` share of items is launched when the test period starts. Their earlier
  events are taken out of the world: no fit row, counter or history holds them, the compressor (MARC or
  PCA) is fitted without them, and their ids are unseen. Daily features otherwise (a new item is on its
  first day: nothing but its content is known of it). Disjoint draws of that share (5 at 0.2, or
  `--cold-folds`) each get a world of their own; every test row is scored once by the world that held its
  item out ("cold items", and its history slices) and once by the next, where it was warm ("warm items").

Arms, all with the ids, counters and content (genres, year) of the production encoder
(models/ctr/features.py), differing only in what else the model sees:
- ids + counters + content;
- + LLM item vector: PCA (64 dims, int8 round trip: the published size) of the tapped layer's item states;
- + LLM history: the user's liked and disliked means of those vectors and the candidate's cosine with each;
- + both;
- + genre history: the same history over genre multi-hots (no LLM);
- + id-embedding history (out-of-fold): over item factors from the fit rows' user-item matrix (no LLM);
  the fit rows of one half of the users see factors fitted on the other half only.
The layer is chosen per protocol on the valid rows (the "+ both" arm at each of `--layers`, first seed; the
curve is reported, tree family only), then every arm uses it. The DNN family runs the arms whose vectors its
LLM branch takes as a whole (ids, + item, + both, + genre history with its item vector).

Statistics: every difference is paired over one set of `ctr.n_boot` user resamples (the whole test set's
users; a slice keeps its own rows of each drawn user), AUC and LogLoss, with the half-width of its interval:
the smallest difference it could detect. Every arm's predictions are averaged over `--seeds` seeds. Results:
<out>/ctr_results.json (its `comparisons` list) and <out>/ctr_results.md.
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
from llmfeat.job_args import PROTOCOLS, ablation_args
from llmfeat.models.ctr.history import DAY_US, earlier_counts, epoch_micros, history_means
from llmfeat.models.evaluation.ab_stats import paired_deltas
from llmfeat.models.evaluation.metrics import auc, user_weights
from llmfeat.models.evaluation.slices import history_slices
from llmfeat.reprs import ReprError, dequantise_int8, layer_matrix, quantise_int8, repr_table
from llmfeat.sample import Sample

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("llmfeat.ablation")
DIM = 64  # the published vectors' width: every LLM arm compares at 64 x int8
BASE, ITEM, HISTORY, BOTH = "ids + counters + content", "+ LLM item vector", "+ LLM history", "+ both"
GENRE, ID_EMB = "+ genre history", "+ id-embedding history (out-of-fold)"
# arm -> (representation, blocks of the tree matrix beyond the base)
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    BASE: ("llm", ()),
    ITEM: ("llm", ("item",)),
    HISTORY: ("llm", ("history",)),
    BOTH: ("llm", ("item", "history")),
    GENRE: ("genre", ("history",)),
    ID_EMB: ("id", ("history",)),
}
DNN_ARMS = {
    BASE: ("llm", ()),
    ITEM: ("llm", ("item",)),
    BOTH: ("llm", ("item", "history")),
    GENRE: ("genre", ("item", "history")),
}
PAIRS = [
    (BASE, ITEM),
    (BASE, HISTORY),
    (BASE, BOTH),
    (BASE, GENRE),
    (BASE, ID_EMB),
    (GENRE, HISTORY),
    (GENRE, BOTH),
]
LLM_ARMS = {ITEM, HISTORY, BOTH}


@dataclass
class Events:
    """Every interaction of the sampled users, in one frame, with the per-item inputs of the arms."""

    frame: pd.DataFrame  # user_id, item_id, label, split, event_timestamp, year, genres
    user: np.ndarray  # (N,) int
    item: np.ndarray  # (N,) int into item_keys
    micros: np.ndarray  # (N,) int64 epoch microseconds
    day: np.ndarray  # (N,) int
    item_keys: np.ndarray  # (I,)
    genres: np.ndarray  # (I, G) multi-hot
    states: dict[int, np.ndarray]  # layer -> (I, H) the LLM's item states


def load_events(settings: Settings, layers: Sequence[int], spark: SparkSession | None = None) -> Events:
    from llmfeat.delta_io import open_tables

    sample = Sample(open_tables(settings, spark), settings.sample)
    inter = sample.read("interactions")
    items = sample.items_of(inter)
    f = inter.select(["user_id", "item_id", "label", "split", "event_timestamp"]).to_pandas()
    meta = items.select(["item_id", "year", "genres"]).to_pandas()
    f = f.merge(meta, on="item_id", how="left", validate="many_to_one")
    f = f.sort_values("event_timestamp", kind="mergesort").reset_index(drop=True)
    item_keys = meta["item_id"].to_numpy(object)
    item = pd.Index(item_keys).get_indexer(f["item_id"])
    ts = epoch_micros(f["event_timestamp"])
    names = sorted({g for s in meta["genres"].dropna() for g in str(s).split("|") if g})
    genres = np.zeros((len(item_keys), len(names)), np.float32)
    for row, value in enumerate(meta["genres"]):
        for g in str(value).split("|") if isinstance(value, str) else ():
            genres[row, names.index(g)] = 1.0
    table = sample.read(repr_table("items"), item_id=item_keys)
    states = {layer: layer_matrix(table, "items", layer, item_keys) for layer in layers}
    return Events(f, pd.factorize(f["user_id"])[0], item, ts, ts // DAY_US, item_keys, genres, states)


def int8_round_trip(z: np.ndarray) -> np.ndarray:
    return dequantise_int8(*quantise_int8(z.astype(np.float32)))


def pca_items(states: np.ndarray, fit_items: np.ndarray) -> np.ndarray:
    """(I, 64) int8-round-tripped PCA of the item states, fitted on `fit_items` only (unsupervised)."""
    from llmfeat.models.marc.baselines import pca

    return int8_round_trip(pca(states[fit_items], DIM)(states))


def item_factors(
    users: np.ndarray, items: np.ndarray, labels: np.ndarray, n_items: int, k: int = 32
) -> np.ndarray:
    """(I, k) item factors of the like (+1) / dislike (-1) matrix of these rows (truncated SVD): an id
    representation learned from labels, without an LLM."""
    u = pd.factorize(users)[0]
    m = np.zeros((u.max() + 1 if len(u) else 1, n_items), np.float32)
    np.add.at(m, (u, items), 2.0 * labels - 1.0)
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    out = np.zeros((n_items, k), np.float32)  # fewer users than k: the missing factors stay zero
    r = min(k, len(s))
    out[:, :r] = vt[:r].T * np.sqrt(s[:r])
    return out


@dataclass
class World:
    """One protocol's rows: the scoring frame (all vector columns of each representation), masks, slices."""

    name: str
    frames: dict[str, pd.DataFrame]  # representation -> scoring frame
    masks: dict[str, np.ndarray]
    slices: dict[str, np.ndarray]  # name -> (N,) bool


class LlmItems:
    """The LLM item vectors (I, 64) of a tapped layer, as the arms see them (int8 round trip: the published
    size). `pca`: principal components of the item states, fitted on the items of the fit rows (no labels).
    `marc`: the MARC compressor fitted as `llmfeat train-compressor` fits it (user snapshots and items of
    the layer, MARC's fitting period, marc.* settings), without the rows of held-out items; one fit per layer
    and held-out set. MARC needs the layer in user_snapshots_repr too."""

    def __init__(self, ev: Events, settings: Settings, kind: str):
        self.ev, self.settings, self.kind = ev, settings, kind
        self.fits: dict[tuple[int, bytes], np.ndarray] = {}

    def layers(self, wanted: Sequence[int]) -> list[int]:
        if self.kind == "pca":
            return list(wanted)
        from llmfeat.delta_io import open_tables
        from llmfeat.sample import distinct_values

        tables = open_tables(self.settings)
        users = set(distinct_values(tables, repr_table("user_snapshots"), ["layer"]).get("layer", []))
        kept = [k for k in wanted if k in users]
        if not kept:
            raise ReprError(f"marc: none of layers {list(wanted)} is in {repr_table('user_snapshots')}")
        return kept

    def __call__(self, layer: int, fit_items: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        if self.kind == "pca":
            return pca_items(self.ev.states[layer], fit_items)
        key = (layer, held_out.tobytes())
        if key not in self.fits:
            self.fits[key] = self._marc(layer, set(self.ev.item_keys[held_out]))
        return self.fits[key]

    def _marc(self, layer: int, held_out: set[str]) -> np.ndarray:
        from llmfeat.models.marc.train import compress, fit_marc, marc_periods
        from llmfeat.spark_jobs.train_compressor import load_inputs, marc_config, train_config

        cfg = self.settings.marc.model_copy(update={"layer": layer})
        a, states, _ = load_inputs(None, self.settings.model_copy(update={"marc": cfg}))
        periods = marc_periods(a.timestamp, a.split, cfg.fit_frac, cfg.stop_frac)
        kept = ~np.isin(a.item_keys[a.item_idx], list(held_out))
        fit = fit_marc(
            a,
            states["users"],
            states["items"],
            marc_config(cfg, states["items"].shape[1]),
            train_config(cfg),
            fit_rows=np.flatnonzero(periods["marc_fit"] & kept),
            stop_rows=np.flatnonzero(periods["marc_stop"] & kept),
            max_fit_rows=cfg.max_fit_rows,
        )
        z = int8_round_trip(compress(fit.compressor("items"), states["items"]))  # (I', 64), a.item_keys order
        out = np.zeros((len(self.ev.item_keys), z.shape[1]), np.float32)
        found = pd.Index(a.item_keys).get_indexer(self.ev.item_keys)
        out[found >= 0] = z[found[found >= 0]]
        log.info("MARC at layer %d fitted without %d held-out items", layer, len(held_out))
        return out


def build_world(
    ev: Events,
    protocol: str,
    layer: int,
    cold: np.ndarray,
    settings: Settings,
    reps: Sequence[str],
    llm: LlmItems | None = None,
) -> World:
    """The protocol's rows and features; `reps`: which item representations to build frames for."""
    from llmfeat.spark_jobs.training_set import split_masks

    keep = np.ones(len(ev.frame), bool)
    if protocol == "cold_items":  # launched at the test period: their earlier events never happened
        keep = ~(cold[ev.item] & (ev.frame["split"] != "test").to_numpy())
    f = ev.frame[keep].reset_index(drop=True)
    user, item, micros, day = ev.user[keep], ev.item[keep], ev.micros[keep], ev.day[keep]
    y = f["label"].to_numpy(np.int64)
    masks = split_masks(f, settings.ctr.stop_frac)
    clock = micros if protocol == "fresh" else day  # cold items: daily, as a new item is on its first day
    for who, key in (("user", user), ("item", item)):  # as of the previous day, as Feast's daily counters
        f[f"{who}_impressions"], f[f"{who}_clicks"] = earlier_counts(key, day, y)
    n, liked = earlier_counts(user, clock, y)
    base, prior = float(y[masks["train"]].mean()), settings.state.prior_weight
    f["event_count"] = n
    f["like_rate"] = np.where(n > 0, (liked + prior * base) / (n + prior), np.nan)
    f["item_event_count"], f["item_liked_count"] = earlier_counts(item, clock, y)
    fit_items = np.unique(item[masks["fit"]])
    frames = {}
    for rep in reps:
        vectors: np.ndarray | tuple[np.ndarray, np.ndarray]
        if rep == "llm":
            held_out = cold if protocol == "cold_items" else np.zeros_like(cold)
            vectors = (llm or LlmItems(ev, settings, "pca"))(layer, fit_items, held_out)
        elif rep == "genre":
            vectors = ev.genres
        else:
            vectors = out_of_fold_histories(f, user, item, clock, y, masks, len(ev.item_keys))
        frames[rep] = with_vectors(f, user, item, clock, y, n, vectors)
    return World(protocol, frames, masks, slices(user, item, micros, y, cold[item], protocol))


def with_vectors(
    f: pd.DataFrame,
    user: np.ndarray,
    item: np.ndarray,
    clock: np.ndarray,
    y: np.ndarray,
    n: np.ndarray,
    vectors: np.ndarray | tuple[np.ndarray, np.ndarray],
) -> pd.DataFrame:
    """f plus item_vector, liked_mean and disliked_mean (null before the user's first event). `vectors`:
    (I, D), or (per-row item vectors (N, D), per-row histories (N, 2D)) when rows differ in what they see."""
    if isinstance(vectors, tuple):
        per_row, hist = vectors
    else:
        per_row, hist = vectors[item], history_means(user, item, clock, y, vectors)
    d = per_row.shape[1]
    none = n == 0
    out = f.copy()
    out["item_vector"] = list(per_row.astype(np.float32))
    out["liked_mean"] = [None if m else v for v, m in zip(hist[:, :d], none, strict=True)]
    out["disliked_mean"] = [None if m else v for v, m in zip(hist[:, d:], none, strict=True)]
    return out


def out_of_fold_histories(
    f: pd.DataFrame,
    user: np.ndarray,
    item: np.ndarray,
    clock: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
    n_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Id-embedding item vectors and histories: a fit row of a user in one half sees factors fitted on the
    other half's fit rows (its own label never shaped them); other rows see factors of all fit rows."""
    fit = masks["fit"]
    half = (user % 2).astype(bool)
    every = item_factors(user[fit], item[fit], y[fit], n_items)
    per_row, hist = every[item], history_means(user, item, clock, y, every)
    for side in (False, True):
        other = fit & (half != side)
        factors = item_factors(user[other], item[other], y[other], n_items)
        rows = fit & (half == side)
        per_row[rows] = factors[item[rows]]
        hist[rows] = history_means(user, item, clock, y, factors)[rows]
    return per_row, hist


def slices(
    user: np.ndarray, item: np.ndarray, micros: np.ndarray, y: np.ndarray, cold: np.ndarray, protocol: str
) -> dict[str, np.ndarray]:
    """The history slices (models/evaluation/slices.py) and, under the cold-items protocol, cold and warm."""
    out = history_slices(user, item, micros, y)
    if protocol == "cold_items":
        out["cold items"], out["warm items"] = cold, ~cold
    return out


def usable(frame: pd.DataFrame, fit: np.ndarray) -> pd.DataFrame:
    """The frame without vector columns that no fit row has (e.g. daily histories where every user's rows
    fall on one day): the encoder cannot fit what it never sees, and the arm then equals the one without."""
    empty = [c for c in ("liked_mean", "disliked_mean") if c in frame and frame.loc[fit, c].isna().all()]
    if empty:
        log.warning("no fit row has %s: those arms see no history", ", ".join(empty))
    return frame.drop(columns=empty)


def block_columns(names: list[str], blocks: Sequence[str]) -> np.ndarray:
    """Indices of the tree matrix's columns an arm sees: the base, plus item vectors and/or the history."""
    from llmfeat.models.ctr.features import FRESH_COSINES

    def block(name: str) -> str:
        if name.startswith("item_vector_"):
            return "item"
        if name.startswith(("liked_mean_", "disliked_mean_")) or name in FRESH_COSINES:
            return "history"
        return "base"

    return np.array([k for k, n in enumerate(names) if block(n) == "base" or block(n) in blocks])


class TreeArms:
    """The tree family: one encoder and matrix per representation, an arm is a set of its columns."""

    def __init__(self, world: World, settings: Settings):
        from llmfeat.models.ctr.features import FeatureEncoder
        from llmfeat.models.ctr.tree import tree_feature_names, tree_matrix

        self.world, self.cfg = world, settings.ctr
        self.matrices: dict[str, tuple[np.ndarray, list[str]]] = {}
        for rep, frame in world.frames.items():
            frame = usable(frame, world.masks["fit"])
            y = frame["label"].to_numpy(np.float32)
            encoder = FeatureEncoder.fit(frame, y, world.masks["fit"], world.masks["train"], True)
            self.matrices[rep] = (tree_matrix(encoder.transform(frame)), tree_feature_names(encoder))
        self.y = next(iter(world.frames.values()))["label"].to_numpy(np.float32)

    def predict(self, rep: str, blocks: Sequence[str], seed: int) -> np.ndarray:
        from llmfeat.models.ctr.tree import fit_booster

        x, names = self.matrices[rep]
        cols = block_columns(names, blocks)
        cfg = self.cfg.model_copy(update={"seed": seed})
        m = self.world.masks
        booster = fit_booster(x[:, cols], self.y, m["fit"], m["valid"], [names[c] for c in cols], cfg)
        return np.asarray(booster.predict(x[:, cols], num_iteration=booster.best_iteration), np.float64)


class DnnArms:
    """The DNN family: the id model and its LLM branch (models/ctr/train.py) on the arm's columns."""

    def __init__(self, world: World, settings: Settings):
        self.world, self.cfg = world, settings.ctr

    def predict(self, rep: str, blocks: Sequence[str], seed: int) -> np.ndarray:
        from llmfeat.models.ctr.train import fit_model, predict

        frame = usable(self.world.frames[rep], self.world.masks["fit"])
        drop = [] if "history" in blocks else ["liked_mean", "disliked_mean"]
        drop += [] if "item" in blocks else ["item_vector"]
        frame = frame.drop(columns=[c for c in drop if c in frame])
        cfg = self.cfg.model_copy(update={"seed": seed})
        model, encoder = fit_model(frame, self.world.masks, bool(blocks), cfg)
        return predict(model, encoder, frame)


def cold_folds(n_items: int, frac: float, seed: int, folds: int | None = None) -> list[np.ndarray]:
    """Disjoint seeded draws of `frac` of the items, as many as fit (5 at 0.2) or `folds`: each draw is
    launched at the test period in a world of its own, so every covered item's test rows are scored cold
    once, pooled over the draws (k-fold cold start: 5x the cold rows of one draw, the same share held out)."""
    order = np.random.default_rng(seed).permutation(n_items)
    size = max(1, int(round(frac * n_items)))
    k = n_items // size if folds is None else min(folds, n_items // size)
    out = []
    for fold in range(k):
        cold = np.zeros(n_items, bool)
        cold[order[fold * size : (fold + 1) * size]] = True
        out.append(cold)
    return out


def run(
    spark: SparkSession | None,
    settings: Settings,
    family: str = "lightgbm",
    protocols: Sequence[str] = PROTOCOLS,
    layers: Sequence[int] = (8, 15, 22, 30),
    seeds: int = 5,
    cold_frac: float = 0.2,
    out: Path = Path("docs"),
    representation: str = "marc",
    folds: int | None = None,
) -> dict[str, Any]:
    """Every protocol's layer curve (trees), arms and comparisons; results merged into <out>/ctr_results.json
    (this family's entries replaced) after each protocol, so a long run leaves what it has."""
    started = time.monotonic()
    ev = load_events(settings, layers if representation == "pca" else [], spark)
    llm = LlmItems(ev, settings, representation)
    layers = llm.layers(layers)
    draws = cold_folds(len(ev.item_keys), cold_frac, settings.ctr.seed, folds)
    results: dict[str, Any] = {
        "family": family,
        "representation": representation,
        "n_boot": settings.ctr.n_boot,
        "cold_items_frac": cold_frac,
        "cold_item_folds": len(draws),
        "protocols": {},
        "comparisons": [],
    }
    arms = ARMS if family == "lightgbm" else DNN_ARMS
    for protocol in protocols:
        worlds = draws if protocol == "cold_items" else [np.zeros(len(ev.item_keys), bool)]
        curve = {}
        if family == "lightgbm":
            for layer in layers:
                valid, test = [], []
                for cold in worlds:
                    world = build_world(ev, protocol, layer, cold, settings, ["llm"], llm)
                    p = TreeArms(world, settings).predict("llm", ARMS[BOTH][1], 0)
                    valid.append(_auc(world, p, "valid"))
                    test.append(_auc(world, p, "test"))
                curve[layer] = {"valid_auc": float(np.mean(valid)), "test_auc": float(np.mean(test))}
                log.info("%s layer %d: valid AUC %.4f", protocol, layer, curve[layer]["valid_auc"])
            chosen = max(curve, key=lambda k: curve[k]["valid_auc"])
        else:
            chosen = _chosen_layer(out, protocol, layers, representation)
        reps = sorted({rep for rep, _ in arms.values()})
        fitted = []
        for k, cold in enumerate(worlds):
            world = build_world(ev, protocol, chosen, cold, settings, reps, llm)
            fitter = TreeArms(world, settings) if family == "lightgbm" else DnnArms(world, settings)
            preds: dict[str, list[np.ndarray]] = {}
            for name, (rep, blocks) in arms.items():
                preds[name] = [fitter.predict(rep, blocks, seed) for seed in range(seeds)]
                log.info("%s %s (world %d of %d): %d seed(s), valid AUC %.4f", protocol, name, k + 1,
                         len(worlds), seeds, _auc(world, preds[name][0], "valid"))  # fmt: skip
            fitted.append((world, preds))
        scored = pooled_cold_and_warm(fitted) if protocol == "cold_items" else fitted
        results["protocols"][protocol] = {
            "layer": chosen,
            "layer_curve": curve,
            "slices": {k: v for world, _ in scored for k, v in _slice_sizes(world).items()},
            "arms": {
                name: {
                    "seeds": len(v),
                    "valid_auc": float(np.mean([_auc(w, np.mean(p[name], 0), "valid") for w, p in fitted])),
                }
                for name, v in fitted[0][1].items()
            },
        }
        for world, preds in scored:
            results["comparisons"] += compare_arms(world, preds, family, representation, settings.ctr.n_boot)
        results["seconds"] = time.monotonic() - started
        write_results(out, results)
    return results


def pooled_cold_and_warm(
    fitted: list[tuple[World, dict[str, list[np.ndarray]]]],
) -> list[tuple[World, dict[str, list[np.ndarray]]]]:
    """The cold-items worlds' test rows (the same rows in each: only earlier rows differ) pooled twice:
    each row scored by the world that held its item out ("cold items", with the history slices under that
    world's counts), and by the next world, where its item was warm ("warm items")."""
    worlds = [w for w, _ in fitted]

    def on_test(per_world: list[np.ndarray]) -> np.ndarray:
        """(worlds, test rows): each world's values at its test rows."""
        return np.stack([v[w.masks["test"]] for w, v in zip(worlds, per_world, strict=True)])

    frames = [{rep: f[w.masks["test"]].reset_index(drop=True) for rep, f in w.frames.items()} for w in worlds]
    keys = [next(iter(f.values()))[["user_id", "item_id"]] for f in frames]
    if not all(k.equals(keys[0]) for k in keys):
        raise AssertionError("the cold-items worlds disagree on the test rows")
    cold = on_test([w.slices["cold items"] for w in worlds])
    covered, at = np.asarray(cold.any(0)), np.arange(cold.shape[1])
    cold_world = cold.argmax(0)  # an uncovered row: world 0, where it is warm; outside the cold slice
    warm_world = (cold_world + 1) % len(fitted)
    stacked = {  # arm -> seed -> (worlds, test rows)
        name: [on_test([p[name][s] for _, p in fitted]) for s in range(len(seeds))]
        for name, seeds in fitted[0][1].items()
    }

    def scored_by(world_of_row: np.ndarray) -> dict[str, list[np.ndarray]]:
        return {name: [p[world_of_row, at] for p in seeds] for name, seeds in stacked.items()}

    slices: dict[str, np.ndarray] = {"cold items": covered}
    for name in fitted[0][0].slices:
        if name not in ("all", "cold items", "warm items"):
            by_world = on_test([w.slices[name] for w in worlds])
            slices[f"cold items, {name}"] = covered & by_world[cold_world, at]
    warm: np.ndarray = np.ones(len(at), bool) if len(fitted) > 1 else ~covered
    test = {"test": np.ones(len(at), bool)}
    return [
        (World("cold_items", frames[0], test, slices), scored_by(cold_world)),
        (World("cold_items", frames[0], test, {"warm items": warm}), scored_by(warm_world)),
    ]


def _auc(world: World, p: np.ndarray, split: str) -> float:
    m = world.masks[split]
    return auc(next(iter(world.frames.values()))["label"].to_numpy()[m], p[m])


def _slice_sizes(world: World) -> dict[str, dict[str, int]]:
    f, test = next(iter(world.frames.values())), world.masks["test"]
    return {
        name: {"rows": int((test & m).sum()), "users": int(f.loc[test & m, "user_id"].nunique())}
        for name, m in world.slices.items()
    }


def _chosen_layer(out: Path, protocol: str, layers: Sequence[int], representation: str) -> int:
    """The DNN uses the layer the trees chose on validation (the curve is a tree-only cost)."""
    path = out / "ctr_results.json"
    if path.exists():
        trees = json.loads(path.read_text()).get("runs", {}).get(run_key("lightgbm", representation), {})
        chosen = trees.get("protocols", {}).get(protocol, {})
        if "layer" in chosen:
            return int(chosen["layer"])
    return 15 if 15 in layers else layers[0]


def compare_arms(
    world: World, preds: dict[str, list[np.ndarray]], family: str, representation: str, n_boot: int
) -> list[dict[str, Any]]:
    """Paired differences (b - a) of every pair whose arms were run, on every slice of the test rows."""
    f, test = next(iter(world.frames.values())), world.masks["test"]
    y, users = f["label"].to_numpy(np.float64), f["user_id"].to_numpy()
    weights = user_weights(users[test], n_boot)  # one set of user resamples for every comparison
    out = []
    for a, b in PAIRS:
        if a not in preds or b not in preds:
            continue
        k = min(len(preds[a]), len(preds[b]))  # the seeds both have
        pa, pb = np.mean(preds[a][:k], axis=0)[test], np.mean(preds[b][:k], axis=0)[test]
        for name, m in world.slices.items():
            sel = m[test]
            if sel.sum() < 20 or len(set(y[test][sel])) < 2:
                continue
            deltas = paired_deltas(y[test][sel], pa[sel], pb[sel], weights[:, sel])
            for metric, iv in deltas.items():
                out.append(
                    {
                        "protocol": world.name,
                        "slice": name,
                        "a": a,
                        "b": b,
                        "a_uses_llm": a in LLM_ARMS,
                        "b_uses_llm": b in LLM_ARMS,
                        "family": family,
                        "representation": representation,
                        "metric": metric,
                        "diff": [iv.mean, iv.low, iv.high],
                        "detectable": (iv.high - iv.low) / 2,
                        "rows": int(sel.sum()),
                        "users": int(len(set(users[test][sel]))),
                        "n_boot": n_boot,
                        "seeds": k,
                    }
                )
    return out


def run_key(family: str, representation: str) -> str:
    return f"{family} / {representation}"


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Merge this run's results (one family and representation) into <out>/ctr_results.json, replacing that
    pair's earlier ones for the protocols it ran, and rewrite <out>/ctr_results.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ctr_results.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored = stored if "runs" in stored else {"runs": {}}  # a file of an older layout is replaced
    key = run_key(results["family"], results["representation"])
    earlier = stored["runs"].get(key, {}).get("protocols", {})
    run = {k: v for k, v in results.items() if k != "comparisons"}
    stored["runs"][key] = {**run, "protocols": {**earlier, **results["protocols"]}}
    mine = {(c["family"], c["representation"], c["protocol"]) for c in results["comparisons"]}
    kept = [
        c
        for c in stored.get("comparisons", [])
        if (c["family"], c["representation"], c["protocol"]) not in mine
    ]
    stored["comparisons"] = kept + results["comparisons"]
    path.write_text(json.dumps(stored, indent=1))
    (out / "ctr_results.md").write_text(markdown(stored))


def headline(stored: dict[str, Any]) -> str:
    """One table of every run's AUC differences on all test rows (and the cold items' rows): the summary
    docs/ctr.md shows."""
    pairs = [(BASE, ITEM), (BASE, HISTORY), (BASE, BOTH), (BASE, GENRE), (BASE, ID_EMB), (GENRE, HISTORY)]
    head = ["| run | protocol | layer | slice (rows / users) |", "|---|---|---|---|"]
    head[0] += "".join(f" {b} - {'ids' if a == BASE else a} |" for a, b in pairs)
    head[1] += "---|" * len(pairs)
    lines = []
    for key, r in sorted(stored["runs"].items()):
        for protocol, p in r["protocols"].items():
            for name in ("all", "cold items", "warm items"):
                cells = []
                size = ""
                for a, b in pairs:
                    want = {"family": r["family"], "representation": r["representation"],
                            "protocol": protocol, "slice": name, "a": a, "b": b, "metric": "auc"}  # fmt: skip
                    found = [c for c in stored["comparisons"] if all(c[k] == v for k, v in want.items())]
                    if found:
                        d, size = found[0]["diff"], f"{found[0]['rows']:,} / {found[0]['users']}"
                        cells.append(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
                    else:
                        cells.append("-")
                if size:
                    lines.append(
                        f"| {key} | {protocol} | {p['layer']} | {name} ({size}) | " + " | ".join(cells) + " |"
                    )
    return "\n".join(head + lines)


def markdown(stored: dict[str, Any]) -> str:
    lines = [
        "# CTR ablation: what LLM features add, by protocol, family and slice",
        "",
        "Written by `llmfeat ctr-ablation` from ctr_results.json. AUC(b) - AUC(a) on the test rows, 95% "
        "interval over user resamples; `±` is the half-width, the smallest difference the comparison "
        "could detect.",
        "",
        headline(stored),
        "",
    ]
    for key, r in sorted(stored["runs"].items()):
        family, representation = r["family"], r["representation"]
        lines += [f"## {key} ({r['n_boot']} user resamples, cold items {r['cold_items_frac']:.0%})", ""]
        for protocol, p in r["protocols"].items():
            curve = ", ".join(f"{k}: {v['valid_auc']:.4f}" for k, v in p["layer_curve"].items())
            lines += [
                f"### {protocol}: layer {p['layer']}" + (f" (valid AUC by layer: {curve})" if curve else ""),
                "",
                "| b | a | slice | rows / users | seeds | AUC b - a [95%] | ± |",
                "|---|---|---|---|---|---|---|",
            ]
            for c in stored["comparisons"]:
                mine = c["family"] == family and c["representation"] == representation
                if mine and c["protocol"] == protocol and c["metric"] == "auc":
                    d = c["diff"]
                    lines.append(
                        f"| {c['b']} | {c['a']} | {c['slice']} | {c['rows']:,} / {c['users']} | "
                        f"{c['seeds']} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | {c['detectable']:.4f} |"
                    )
            lines.append("")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    from llmfeat.runner import command_settings

    settings = command_settings("ctr-ablation", args.config, args.overrides)
    if settings is None:
        return 2
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not 0 < args.cold_items < 1 or (args.cold_folds is not None and args.cold_folds < 1):
        print(
            f"ctr-ablation: unknown protocol {unknown} (expected {', '.join(PROTOCOLS)}), --cold-items "
            f"{args.cold_items} not in (0, 1) or --cold-folds {args.cold_folds} below 1",
            file=sys.stderr,
        )
        return 2
    layers = [int(x) for x in args.layers.split(",") if x]
    run(
        None,
        settings,
        args.family,
        protocols,
        layers,
        args.seeds,
        args.cold_items,
        args.out,
        args.representation,
        args.cold_folds,
    )
    print((args.out / "ctr_results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args

    parser = argparse.ArgumentParser(prog="llmfeat ctr-ablation")
    config_args(parser)
    ablation_args(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy, as the CLI does.
    from llmfeat.spark_jobs.ctr_ablation import main as package_main

    sys.exit(package_main())
