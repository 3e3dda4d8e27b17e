"""What an item representation can say about a new item: its test-period like rate, predicted from the
representation alone by a model fitted on other items (results: docs/ctr.md, "Cold items").

    .venv/bin/python bench/cold_item_prior.py [--config local] [--layers 8,15,22,30] [--folds 5]

The items are cut into `--folds` seeded folds; each fold's items are held out of a ridge regression from the
representation to the other items' like rate over the train and valid splits (smoothed toward the base rate,
weighted by rows), which then predicts the held-out items. Printed: the correlation of the predictions with
each item's like rate in the test split, weighted by its test rows, for genres + year, the PCA-64 of the
LLM's item states at each layer (`ctr-ablation --representation pca`'s vectors), and both together.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd


def ridge(x: np.ndarray, target: np.ndarray, weight: np.ndarray, lam: float) -> np.ndarray:
    xc = np.column_stack([x, np.ones(len(x))]) * np.sqrt(weight)[:, None]
    return np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (target * np.sqrt(weight)))


def weighted_corr(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    da, db = a - np.average(a, weights=w), b - np.average(b, weights=w)
    cov = np.average(da * db, weights=w)
    return float(cov / np.sqrt(np.average(da**2, weights=w) * np.average(db**2, weights=w)))


def main() -> int:
    from llmfeat.config import load_settings
    from llmfeat.spark_jobs.ctr_ablation import load_events, pca_items

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="local")
    parser.add_argument("--layers", default="8,15,22,30")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--prior-rows", type=float, default=5.0, help="rows of base rate added to each item")
    args = parser.parse_args()
    layers = [int(k) for k in args.layers.split(",")]
    ev = load_events(load_settings(args.config), layers)
    y, split, n_items = ev.frame["label"].to_numpy(float), ev.frame["split"].to_numpy(), len(ev.item_keys)

    def counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.bincount(ev.item[mask], minlength=n_items).astype(float)
        return rows, np.bincount(ev.item[mask], weights=y[mask], minlength=n_items)

    (n_fit, k_fit), (n_test, k_test) = counts(split != "test"), counts(split == "test")
    base = k_fit.sum() / n_fit.sum()
    year = pd.to_numeric(ev.frame.groupby(ev.item)["year"].first().reindex(range(n_items)), errors="coerce")
    content = np.column_stack([ev.genres, (year.fillna(year.median()).to_numpy() - 1990) / 10])
    folds = np.array_split(np.random.default_rng(0).permutation(n_items), args.folds)
    tested = n_test > 0

    def score(x: np.ndarray, lam: float) -> float:
        pred = np.zeros(n_items)
        for held in folds:
            fit = np.setdiff1d(np.arange(n_items), held)
            fit = fit[n_fit[fit] > 0]
            target = (k_fit[fit] + args.prior_rows * base) / (n_fit[fit] + args.prior_rows)
            coef = ridge(x[fit], target, n_fit[fit], lam)
            pred[held] = np.column_stack([x[held], np.ones(len(held))]) @ coef
        return weighted_corr(pred[tested], k_test[tested] / n_test[tested], n_test[tested])

    print(f"{tested.sum()} items with test rows; correlation with their test like rate (weighted by rows)")
    print(f"genres + year: {score(content, 10):.3f}")
    for layer in layers:
        z = pca_items(ev.states[layer], np.flatnonzero(n_fit > 0))
        z = z / (z.std(0) + 1e-6)
        both = np.column_stack([z, content])
        print(f"layer {layer}: PCA-64 {score(z, 100):.3f}, PCA-64 + genres + year {score(both, 100):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
