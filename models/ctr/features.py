"""Scoring frame -> model inputs: vocabularies and statistics fitted on training rows, saved with the model.

The scoring frame is what training, the offline comparison and the ranking service all build (from Feast):
    user_id str, item_id str, year float (NaN = unknown), genres str ("A|B", None = unknown),
    user_impressions, user_clicks, item_impressions, item_clicks (point-in-time counters up to the previous
    day; null = none yet), user_vector list[float] | None, item_vector list[float] | None (LLM models only)

Fitted once on the training rows (`FeatureEncoder.fit`) and stored as JSON next to the weights:
- id vocabularies (index 0 = an id unseen in training), the genre vocabulary, the base click rate;
- per-dimension mean / std of the LLM vectors over distinct vectors (vectors arrive on one scale).
Dense features F: year_z, year_missing, log1p item impressions, item click rate (smoothed), log1p user
impressions, user click rate (smoothed), user has history; all from the point-in-time counters, so a row never
counts its own label.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmfeat.errors import UserError
from llmfeat.models.ctr.model import CtrInputs

VECTOR_COLUMNS = ("user_vector", "item_vector")
BASE_DENSE = (
    "year_z", "year_missing", "item_log_count", "item_ctr", "user_log_count", "user_ctr", "user_has_history",
)  # fmt: skip
COUNTERS = ("user_impressions", "user_clicks", "item_impressions", "item_clicks")


@dataclass(frozen=True)
class FeatureEncoder:
    user_ids: list[str]
    item_ids: list[str]
    genres: list[str]
    year_mean: float
    year_std: float
    base_ctr: float
    prior: float  # pseudo-impressions at the base rate in the smoothed click rates
    vec_mean: dict[str, list[float]]  # "user_vector" / "item_vector" -> (D,); empty without LLM features
    vec_std: dict[str, list[float]]

    @property
    def uses_llm(self) -> bool:
        return bool(self.vec_mean)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return BASE_DENSE

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
        (their ids get embeddings); stats_rows (N,) bool: rows the base click rate is taken from (train)."""
        fit = frame[fit_rows]
        base = float(labels[stats_rows].mean())
        genres = sorted({g for s in frame["genres"].dropna() for g in str(s).split("|") if g})
        years = frame["year"].astype(float)
        mean: dict[str, list[float]] = {}
        std: dict[str, list[float]] = {}
        for col in VECTOR_COLUMNS:
            if use_llm:
                m, s = _vector_moments(fit, col)
                mean[col], std[col] = m.tolist(), s.tolist()
        return cls(
            user_ids=sorted(fit["user_id"].unique().tolist()),
            item_ids=sorted(fit["item_id"].unique().tolist()),
            genres=genres,
            year_mean=float(np.nanmean(years)) if years.notna().any() else 0.0,
            year_std=float(np.nanstd(years)) + 1e-6 if years.notna().any() else 1.0,
            base_ctr=base,
            prior=prior,
            vec_mean=mean,
            vec_std=std,
        )

    def transform(self, frame: pd.DataFrame) -> CtrInputs:
        """Scoring frame (B rows) -> CtrInputs tensors."""
        users = {k: i + 1 for i, k in enumerate(self.user_ids)}
        items = {k: i + 1 for i, k in enumerate(self.item_ids)}
        user = frame["user_id"].map(users).fillna(0).to_numpy(np.int64)  # (B,)
        item = frame["item_id"].map(items).fillna(0).to_numpy(np.int64)  # (B,)
        dense = [*self._year(frame), *self._counters(frame)]
        vectors: list[np.ndarray] = []
        missing: list[np.ndarray] = []
        for col in VECTOR_COLUMNS:
            v, m = self._vectors(frame, col)
            vectors.append(v)
            missing.append(m.astype(np.float32))
        return CtrInputs(
            user=torch.from_numpy(user),
            item=torch.from_numpy(item),
            genres=torch.from_numpy(self._genres(frame)),
            dense=torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)),  # (B, F)
            user_vec=torch.from_numpy(vectors[0]),
            item_vec=torch.from_numpy(vectors[1]),
            vec_missing=torch.from_numpy(np.stack(missing, axis=1)),  # (B, 2)
        )

    def _year(self, frame: pd.DataFrame) -> list[np.ndarray]:
        year = frame["year"].astype(float).to_numpy()
        missing = np.isnan(year)
        z = np.where(missing, 0.0, (year - self.year_mean) / self.year_std)
        return [z.astype(np.float32), missing.astype(np.float32)]

    def _counters(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """log1p impressions and smoothed click rates of item and user, as of the previous day."""
        out = []
        for who in ("item", "user"):
            n = _column(frame, f"{who}_impressions")
            c = _column(frame, f"{who}_clicks")
            out += [np.log1p(n), (c + self.prior * self.base_ctr) / (n + self.prior)]
        out.append((out[2] > 0).astype(np.float32))  # the user has history on an earlier day
        return [o.astype(np.float32) for o in out]

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
        return cls(**json.loads(path.read_text()))


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A counter column as float64, 0 where null (no interaction yet) or absent."""
    if name not in frame.columns:
        return np.zeros(len(frame))
    return pd.to_numeric(frame[name], errors="coerce").fillna(0).to_numpy(np.float64)


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


def _vector_moments(frame: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per dimension over the fit rows that have a vector (unsupervised)."""
    present = frame[frame[col].map(_is_vector)]
    if present.empty:
        raise UserError(f"no {col} in the training set: are the LLM vectors published and materialized?")
    v = np.stack([np.asarray(x, dtype=np.float32) for x in present[col]])  # (entities, D)
    return v.mean(axis=0), v.std(axis=0) + 1e-6
