"""Scoring frame -> model inputs: vocabularies and statistics fitted on training rows, saved with the model.

The scoring frame is what training, the offline comparison and the ranking service all build (from Feast):
    user_id str, item_id str, year float (NaN = unknown), genres str ("A|B", None = unknown),
    user_vector list[float] | None, item_vector list[float] | None   (only for models with LLM features)

Fitted once on the training rows (`FeatureEncoder.fit`) and stored as JSON next to the weights:
- id vocabularies (index 0 = an id unseen in training), the genre vocabulary;
- the ordinary ID side: train-period impressions and smoothed click rates per user and per item;
- per-dimension mean / std of the LLM vectors over distinct entities (vectors arrive on one scale).
Dense features F: year_z, year_missing, log1p item count, item ctr, log1p user count, user ctr, warm user,
and with LLM features: user_vector_missing, item_vector_missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmfeat.models.ctr.model import CtrInputs

VECTOR_COLUMNS = ("user_vector", "item_vector")
BASE_DENSE = ("year_z", "year_missing", "item_log_count", "item_ctr", "user_log_count", "user_ctr", "warm")
LLM_DENSE = ("user_vector_missing", "item_vector_missing")


@dataclass(frozen=True)
class FeatureEncoder:
    user_ids: list[str]
    item_ids: list[str]
    genres: list[str]
    year_mean: float
    year_std: float
    base_ctr: float
    user_stats: dict[str, tuple[float, float]]  # id -> (train impressions, smoothed ctr)
    item_stats: dict[str, tuple[float, float]]
    vec_mean: dict[str, list[float]]  # "user_vector" / "item_vector" -> (D,); empty without LLM features
    vec_std: dict[str, list[float]]

    @property
    def uses_llm(self) -> bool:
        return bool(self.vec_mean)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return BASE_DENSE + (LLM_DENSE if self.uses_llm else ())

    def vec_dim(self, column: str) -> int:
        return len(self.vec_mean.get(column, []))

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        labels: np.ndarray,
        fit_rows: np.ndarray,
        stats_rows: np.ndarray,
        use_llm: bool,
        prior: float = 10.0,
    ) -> FeatureEncoder:
        """frame: scoring frame of all rows; labels (N,); fit_rows (N,) bool: rows the model is fitted on
        (their ids get embeddings); stats_rows (N,) bool: rows the popularity statistics count (train)."""
        fit, stats = frame[fit_rows], frame[stats_rows]
        base = float(labels[stats_rows].mean())
        genres = sorted({g for s in frame["genres"].dropna() for g in str(s).split("|") if g})
        years = frame["year"].astype(float)
        mean: dict[str, list[float]] = {}
        std: dict[str, list[float]] = {}
        for col, key in zip(VECTOR_COLUMNS, ("user_id", "item_id"), strict=True):
            if use_llm:
                m, s = _vector_moments(frame, col, key)
                mean[col], std[col] = m.tolist(), s.tolist()
        return cls(
            user_ids=sorted(fit["user_id"].unique().tolist()),
            item_ids=sorted(fit["item_id"].unique().tolist()),
            genres=genres,
            year_mean=float(np.nanmean(years)) if years.notna().any() else 0.0,
            year_std=float(np.nanstd(years)) + 1e-6 if years.notna().any() else 1.0,
            base_ctr=base,
            user_stats=_id_stats(stats["user_id"], labels[stats_rows], base, prior),
            item_stats=_id_stats(stats["item_id"], labels[stats_rows], base, prior),
            vec_mean=mean,
            vec_std=std,
        )

    def transform(self, frame: pd.DataFrame) -> CtrInputs:
        """Scoring frame (B rows) -> CtrInputs tensors."""
        users = {k: i + 1 for i, k in enumerate(self.user_ids)}
        items = {k: i + 1 for i, k in enumerate(self.item_ids)}
        user = frame["user_id"].map(users).fillna(0).to_numpy(np.int64)  # (B,)
        item = frame["item_id"].map(items).fillna(0).to_numpy(np.int64)  # (B,)
        dense = [*self._year(frame), *self._id_side(frame)]
        vectors: list[np.ndarray] = []
        for col in VECTOR_COLUMNS:
            v, missing = self._vectors(frame, col)
            vectors.append(v)
            if self.uses_llm:
                dense.append(missing.astype(np.float32))
        return CtrInputs(
            user=torch.from_numpy(user),
            item=torch.from_numpy(item),
            genres=torch.from_numpy(self._genres(frame)),
            dense=torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)),  # (B, F)
            user_vec=torch.from_numpy(vectors[0]),
            item_vec=torch.from_numpy(vectors[1]),
        )

    def _year(self, frame: pd.DataFrame) -> list[np.ndarray]:
        year = frame["year"].astype(float).to_numpy()
        missing = np.isnan(year)
        z = np.where(missing, 0.0, (year - self.year_mean) / self.year_std)
        return [z.astype(np.float32), missing.astype(np.float32)]

    def _id_side(self, frame: pd.DataFrame) -> list[np.ndarray]:
        out = []
        for col, stats in (("item_id", self.item_stats), ("user_id", self.user_stats)):
            pairs = np.array([stats.get(k, (0.0, self.base_ctr)) for k in frame[col]], dtype=np.float32)
            pairs = pairs.reshape(-1, 2)
            out += [np.log1p(pairs[:, 0]), pairs[:, 1]]
        out.append((out[2] > 0).astype(np.float32))  # warm: the user has train-period history
        return out

    def _genres(self, frame: pd.DataFrame) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.genres)}
        out = np.zeros((len(frame), len(self.genres)), dtype=np.float32)  # (B, G)
        for row, value in enumerate(frame["genres"]):
            for g in str(value).split("|") if isinstance(value, str) else ():
                if g in index:
                    out[row, index[g]] = 1.0
        return out

    def _vectors(self, frame: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) standardised vectors with zero rows where missing, and (B,) missing flags."""
        dim = self.vec_dim(col)
        if not dim:
            return np.zeros((len(frame), 0), dtype=np.float32), np.ones(len(frame), dtype=bool)
        raw, missing = stack_vectors(frame[col], dim)
        z = (raw - np.asarray(self.vec_mean[col], np.float32)) / np.asarray(self.vec_std[col], np.float32)
        z[missing] = 0.0
        return z.astype(np.float32), missing

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> FeatureEncoder:
        doc = json.loads(path.read_text())
        for key in ("user_stats", "item_stats"):
            doc[key] = {k: tuple(v) for k, v in doc[key].items()}
        return cls(**doc)


def stack_vectors(column: pd.Series, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of vectors or nulls -> ((B, D) float32 with zero rows where missing, (B,) missing)."""
    missing = np.array([not _is_vector(v) for v in column], dtype=bool)
    out = np.zeros((len(column), dim), dtype=np.float32)
    present = [np.asarray(v, dtype=np.float32) for v, m in zip(column, missing, strict=True) if not m]
    if present:
        out[~missing] = np.stack(present)
    return out, missing


def _is_vector(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _vector_moments(frame: pd.DataFrame, col: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per dimension over distinct entities that have a vector (unsupervised)."""
    present = frame[frame[col].map(_is_vector)].drop_duplicates(key)
    if present.empty:
        raise ValueError(f"no {col} in the training set: are the LLM vectors published and materialized?")
    v = np.stack([np.asarray(x, dtype=np.float32) for x in present[col]])  # (entities, D)
    return v.mean(axis=0), v.std(axis=0) + 1e-6


def _id_stats(
    ids: pd.Series, labels: np.ndarray, base: float, prior: float
) -> dict[str, tuple[float, float]]:
    grouped = pd.DataFrame({"id": ids.to_numpy(), "y": labels}).groupby("id")["y"].agg(["count", "sum"])
    smoothed = (grouped["sum"] + prior * base) / (grouped["count"] + prior)
    return {
        str(k): (float(c), float(r))
        for k, c, r in zip(grouped.index, grouped["count"], smoothed, strict=True)
    }
