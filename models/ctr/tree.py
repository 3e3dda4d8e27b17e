"""The tree ranker: LightGBM over the same scoring frame and the same encoded inputs as the DNN.

Notation: B rows, G genres, F dense features, Du / Di the user / item vector widths.

The encoder (models/ctr/features.py) turns a scoring frame or its arrays into `CtrInputs`; `tree_matrix`
lays them out as one (B, 2 + G + F + Du + Di) float matrix, in the order `tree_feature_names` gives:
- user and item ids as LightGBM categoricals, by the encoder's index: 0 is the one "unseen" level that every
  id outside the fit rows maps to, and that fit rows are given at the valid rows' rate of unseen ids
  (`unseen_ids`), so the trees learn it;
- genres (multi-hot) and the dense features, fresh counters and the candidate's cosines with the user's liked
  and disliked means included (the encoder computes them from the vectors, so the pyfunc does too);
- the standardised vectors, NaN where the row has none: LightGBM learns a direction for missing values
  instead of reading a zero vector as a real one.
The names and this layout travel with the model (TreeRanker in models/ctr/pyfunc.py), so training and
serving build the same matrix. lightgbm is imported only here and only when a tree is fitted or loaded: a
DNN's serving environment does not need it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.models.ctr.features import FeatureEncoder
from llmfeat.models.ctr.model import CtrInputs

if TYPE_CHECKING:
    import lightgbm

    from llmfeat.config import CtrConf

log = logging.getLogger(__name__)

CATEGORICAL = ("user_id", "item_id")  # the first two columns of the matrix


def tree_feature_names(encoder: FeatureEncoder) -> list[str]:
    """The matrix's column names, in order."""
    genres = [f"genre_{re.sub(r'[^0-9A-Za-z]', '_', g)}" for g in encoder.genres]  # LightGBM-safe names
    user = [f"{c}_{k}" for c in encoder.user_columns for k in range(encoder.vec_dim(c))]
    item = [f"item_vector_{k}" for k in range(encoder.vec_dim("item_vector"))]
    return [*CATEGORICAL, *genres, *encoder.dense_names, *user, *item]


def tree_matrix(x: CtrInputs) -> np.ndarray:
    """CtrInputs (B rows) -> (B, 2 + G + F + Du + Di) float32, vectors NaN where missing."""
    user_vec, item_vec = x.user_vec.numpy().copy(), x.item_vec.numpy().copy()
    missing = x.vec_missing.numpy() > 0  # (B, 2)
    user_vec[missing[:, 0]] = np.nan
    item_vec[missing[:, 1]] = np.nan
    ids = np.stack([x.user.numpy(), x.item.numpy()], axis=1).astype(np.float32)  # (B, 2)
    return np.concatenate([ids, x.genres.numpy(), x.dense.numpy(), user_vec, item_vec], axis=1)


def tree_params(cfg: CtrConf) -> dict[str, Any]:
    """LightGBM parameters from the config: binary log-loss, ids as categoricals smoothed toward the mean."""
    return {
        "objective": "binary",
        "metric": "binary_logloss",
        "learning_rate": cfg.tree_learning_rate,
        "num_leaves": cfg.tree_leaves,
        "min_data_in_leaf": cfg.tree_min_leaf,
        "feature_fraction": cfg.tree_feature_fraction,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": cfg.tree_l2,
        "cat_smooth": 50.0,  # an id's rate shrinks toward the mean: 943 users, some with a handful of rows
        "min_data_per_group": 50,
        "seed": cfg.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": cfg.tree_threads,
        "verbosity": -1,
    }


def fit_booster(
    x: np.ndarray,
    y: np.ndarray,
    fit: np.ndarray,
    stop: np.ndarray,
    names: list[str],
    cfg: CtrConf,
    log_metrics: Any = None,
) -> lightgbm.Booster:
    """Boost on the `fit` rows of x (N, F), early-stopped on the log-loss of the `stop` rows; returns the
    booster at its best iteration."""
    import lightgbm

    x_fit = unseen_ids(x, fit, stop, names, cfg)
    train = lightgbm.Dataset(
        x_fit, y[fit], feature_name=names, categorical_feature=categorical_names(names), free_raw_data=True
    )
    valid = lightgbm.Dataset(x[stop], y[stop], reference=train)
    return boost(train, valid, cfg, log_metrics)


def categorical_names(names: list[str]) -> list[str]:
    return [n for n in CATEGORICAL if n in names]


def boost(
    train: lightgbm.Dataset, valid: lightgbm.Dataset, cfg: CtrConf, log_metrics: Any = None
) -> lightgbm.Booster:
    """Boost on `train`, early-stopped on the log-loss of `valid` (built with reference=train); the booster at
    its best iteration, the valid log-loss curve logged (at most 50 points)."""
    import lightgbm

    params = tree_params(cfg)
    record: dict[str, Any] = {}
    callbacks: list[Any] = [
        lightgbm.early_stopping(cfg.tree_early_stop, verbose=False),
        lightgbm.record_evaluation(record),
    ]
    booster = lightgbm.train(
        params, train, cfg.tree_rounds, valid_sets=[valid], valid_names=["valid"], callbacks=callbacks
    )
    losses = record["valid"]["binary_logloss"]
    if log_metrics is not None:
        for step in range(0, len(losses), max(1, len(losses) // 50)):
            log_metrics({"tree_valid_logloss": float(losses[step])}, step)
    log.info("trees: %d (best %d), valid log-loss %.4f", len(losses), booster.best_iteration,
             min(losses))  # fmt: skip
    return booster


def unseen_ids(
    x: np.ndarray, fit: np.ndarray, stop: np.ndarray, names: list[str], cfg: CtrConf
) -> np.ndarray:
    """The fit rows of x with each id set to the "unseen" level (0) at the rate the stop rows have unseen ids
    (`ctr.id_dropout`: "valid_rate", or a fixed rate). Every fit row's id is known, while most scored users
    are new: without this the trees never learn what the unseen level means, and a new user falls to
    whichever side of each id split it happens to land on (on ML-100k, ids as plain categoricals made the
    trees worse than no ids at all)."""
    out = x[fit].copy()
    rng = np.random.default_rng((cfg.seed, 1))
    for col, name in enumerate(names[: len(CATEGORICAL)]):
        if name not in CATEGORICAL:
            continue
        rate = float((x[stop, col] == 0).mean()) if cfg.id_dropout == "valid_rate" else float(cfg.id_dropout)
        out[rng.random(len(out)) < rate, col] = 0.0
        log.info("trees: %s unseen in %.1f%% of fit rows", name, 100 * rate)
    return out


def fit_tree(
    frame: pd.DataFrame, masks: dict[str, np.ndarray], use_llm: bool, cfg: CtrConf, log_metrics: Any = None
) -> tuple[lightgbm.Booster, FeatureEncoder]:
    """Fit the encoder on the fit rows, then the booster on them, early-stopped on the valid rows."""
    y = frame["label"].to_numpy(np.float32)
    encoder = FeatureEncoder.fit(frame, y, masks["fit"], masks["train"], use_llm)
    x = tree_matrix(encoder.transform(frame))
    names = tree_feature_names(encoder)
    return fit_booster(x, y, masks["fit"], masks["valid"], names, cfg, log_metrics), encoder
