"""Scoring frame -> model inputs: vocabularies and statistics fitted on training rows, saved with the model.

The scoring frame is what training, the offline comparison and the ranking service all build (from Feast):
    user_id str, item_id str, year float (NaN = unknown), genres str ("A|B", None = unknown),
    user_impressions, user_clicks, item_impressions, item_clicks (point-in-time counters up to the previous
    day; null = none yet), user_vector list[float] | None, item_vector list[float] | None (LLM models only)

Fitted once on the training rows (`FeatureEncoder.fit`) and stored as JSON next to the weights:
- id vocabularies (index 0 = an id unseen in training), the genre vocabulary, the base click rate;
- per-dimension mean / std of the LLM vectors over distinct vectors (vectors arrive on one scale). The user
  side is the user vector (a daily snapshot) and, with a fresh service, the means of the liked and disliked
  items' vectors (`USER_VECTOR_COLUMNS`): a model sees them together as the user's LLM representation.
Dense features F: year_z, year_missing, log1p item impressions, item click rate (smoothed), log1p user
impressions, user click rate (smoothed), user has history; all from the point-in-time counters, so a row never
counts its own label.

With a fresh feature service (the event-time state, strictly before each row: columns event_count,
like_rate, item_event_count, item_liked_count and, with LLM item vectors, liked_mean / disliked_mean), the
dense features add `FRESH_COUNTERS` and, where the means are there, `FRESH_COSINES`: the candidate item
vector's cosine with the mean vector of the user's liked and of their disliked items, computed here from the
vectors (training, comparison and serving alike), never stored per pair.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
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
FRESH_COLUMNS = ("event_count", "like_rate", "item_event_count", "item_liked_count")
FRESH_VECTORS = ("liked_mean", "disliked_mean")
FRESH_COUNTERS = ("user_log_events", "user_like_rate", "user_has_events", "item_log_events", "item_fresh_ctr")
FRESH_COSINES = ("cos_liked", "cos_disliked")
USER_VECTOR_COLUMNS = ("user_vector", *FRESH_VECTORS)  # the user side, in the order a model sees them


def fresh_dense(
    scalar: Callable[[str], np.ndarray],
    vector: Callable[[str], np.ndarray],
    names: Sequence[str],
    base_ctr: float,
    prior: float,
) -> list[np.ndarray]:
    """The fresh dense features `names` (of FRESH_COUNTERS + FRESH_COSINES) from the state columns:
    scalar(column) -> (B,) float64, NaN = null; vector(column) -> (B, D) float32, NaN or zero rows = none."""
    out: dict[str, np.ndarray] = {}
    events = np.nan_to_num(scalar("event_count"))
    rate = scalar("like_rate")
    out["user_log_events"] = np.log1p(events)
    out["user_like_rate"] = np.where(np.isnan(rate), base_ctr, rate)
    out["user_has_events"] = (events > 0).astype(np.float64)
    shown, clicked = (np.nan_to_num(scalar(c)) for c in ("item_event_count", "item_liked_count"))
    out["item_log_events"] = np.log1p(shown)
    out["item_fresh_ctr"] = (clicked + prior * base_ctr) / (shown + prior)
    if any(n in FRESH_COSINES for n in names):
        item = np.nan_to_num(vector("item_vector"))
        for name, column in zip(FRESH_COSINES, FRESH_VECTORS, strict=True):
            out[name] = row_cosine(item, np.nan_to_num(vector(column)))
    return [out[n].astype(np.float32) for n in names]


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) cosine of matching rows; 0 where either row is all zeros (no vector, no history)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("bd,bd->b", a, b)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


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
    fresh: list[str] = field(default_factory=list)  # fresh dense features used (empty: no fresh service)

    @property
    def uses_llm(self) -> bool:
        return bool(self.vec_mean)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return (*BASE_DENSE, *self.fresh)

    @property
    def fresh_columns(self) -> list[str]:
        """The scoring-frame columns the fresh features read."""
        if not self.fresh:
            return []
        cosines = any(n in FRESH_COSINES for n in self.fresh)
        return [*FRESH_COLUMNS, *(FRESH_VECTORS if cosines else ()), *(["item_vector"] if cosines else [])]

    def vec_dim(self, column: str) -> int:
        return len(self.vec_mean.get(column, []))

    @property
    def user_columns(self) -> list[str]:
        """The user-side vector columns this encoder standardises, in the order they are concatenated."""
        return [c for c in USER_VECTOR_COLUMNS if c in self.vec_mean]

    @property
    def user_dim(self) -> int:
        return sum(self.vec_dim(c) for c in self.user_columns)

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
        for col in (*USER_VECTOR_COLUMNS, "item_vector"):
            if use_llm and col in frame.columns:  # a fresh service has no user_vector, a daily one no means
                m, s = _vector_moments(fit, col)
                mean[col], std[col] = m.tolist(), s.tolist()
        fresh: list[str] = []
        if "event_count" in frame.columns:
            fresh = [*FRESH_COUNTERS]
            if all(c in frame.columns for c in (*FRESH_VECTORS, "item_vector")):
                fresh += FRESH_COSINES
        return cls(
            fresh=fresh,
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

    # Built once per encoder, not per batch: a stream (models/ctr/stream.py) transforms many small batches.
    @cached_property
    def user_index(self) -> dict[str, int]:
        """user id -> embedding index (1..U; 0 is every id outside the fit rows)."""
        return {k: i + 1 for i, k in enumerate(self.user_ids)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {k: i + 1 for i, k in enumerate(self.item_ids)}

    def transform(self, frame: pd.DataFrame) -> CtrInputs:
        """Scoring frame (B rows) -> CtrInputs tensors."""
        user = frame["user_id"].map(self.user_index).fillna(0).to_numpy(np.int64)  # (B,)
        item = frame["item_id"].map(self.item_index).fillna(0).to_numpy(np.int64)  # (B,)
        dense = [*self._year(frame), *self._counters(frame)]
        if self.fresh:
            dense += fresh_dense(
                lambda c: _column(frame, c, fill=np.nan),
                lambda c: _vector_column(frame, c, self._fresh_dim(frame)),
                self.fresh,
                self.base_ctr,
                self.prior,
            )
        vectors: list[np.ndarray] = []
        missing: list[np.ndarray] = []
        for side in (self.user_columns, ["item_vector"]):
            parts = [self._vectors(frame, col) for col in side]
            vectors.append(join_side([v for v, _ in parts], len(frame)))
            missing.append(np.logical_and.reduce([m for _, m in parts] or [np.ones(len(frame), bool)]))
        return CtrInputs(
            user=torch.from_numpy(user),
            item=torch.from_numpy(item),
            genres=torch.from_numpy(self._genres(frame)),
            dense=torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)),  # (B, F)
            user_vec=torch.from_numpy(vectors[0]),
            item_vec=torch.from_numpy(vectors[1]),
            vec_missing=torch.from_numpy(np.stack(missing, axis=1).astype(np.float32)),  # (B, 2)
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

    def _fresh_dim(self, frame: pd.DataFrame) -> int:
        """The width of the vectors the fresh cosines compare (the item vectors')."""
        present = frame["item_vector"].map(_is_vector) if "item_vector" in frame.columns else None
        return 0 if present is None or not present.any() else len(frame["item_vector"][present].iloc[0])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> FeatureEncoder:
        return cls(**json.loads(path.read_text()))


def join_side(parts: list[np.ndarray], b: int) -> np.ndarray:
    """One side's standardised vectors side by side: (B, sum of widths), (B, 0) without any."""
    return np.concatenate(parts, axis=1) if parts else np.zeros((b, 0), dtype=np.float32)


def _column(frame: pd.DataFrame, name: str, fill: float = 0.0) -> np.ndarray:
    """A counter column as float64, `fill` where null (no interaction yet) or absent."""
    if name not in frame.columns:
        return np.full(len(frame), fill)
    return pd.to_numeric(frame[name], errors="coerce").fillna(fill).to_numpy(np.float64)


def _vector_column(frame: pd.DataFrame, name: str, dim: int) -> np.ndarray:
    """(B, D) float32 of a vector column, zero rows where null or absent."""
    if name not in frame.columns or not dim:
        return np.zeros((len(frame), dim), dtype=np.float32)
    return stack_vectors(frame[name], dim)[0]


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
