"""The FeatureEncoder fitted in one pass over a streamed training set, as `FeatureEncoder.fit` fits it on a
frame: vocabularies of the fit rows' ids, the genres and year moments of every row, the base click rate of
the train rows, the LLM vectors' moments over the fit rows that have one.

Held while it reads: the id vocabularies (one entry per user and item, as the embedding tables need anyway),
the genre set and running moments (Chan's pairwise update, float64), never the rows. The moments equal the
frame's up to float rounding (the frame's are float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.errors import UserError
from llmfeat.models.ctr.features import (
    COUNTERS,
    FRESH_COSINES,
    FRESH_COUNTERS,
    FRESH_VECTORS,
    USER_VECTOR_COLUMNS,
    FeatureEncoder,
)
from llmfeat.models.ctr.roles import ROLE_COLUMNS, RowRoles

VECTOR_COLUMNS_ALL = (*USER_VECTOR_COLUMNS, "item_vector")
FIT_COLUMNS = ("user_id", "item_id", "genres", "year", "label", *ROLE_COLUMNS)


@dataclass
class Moments:
    """Running per-dimension mean and variance (population) of rows added in batches."""

    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, x: np.ndarray) -> None:
        """x: (N, D), or (N,) for one dimension."""
        if not len(x):
            return
        x = x.astype(np.float64).reshape(len(x), -1)
        n_b, mean_b = len(x), x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if not self.n:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / total
        self.n = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


def fit_columns(schema: pa.Schema, use_llm: bool) -> list[str]:
    """The columns the encoder's fit reads from a table of this schema."""
    vectors = [c for c in VECTOR_COLUMNS_ALL if use_llm and c in schema.names]
    return [*FIT_COLUMNS, *vectors]


def fit_encoder_stream(
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    roles: RowRoles,
    use_llm: bool,
    prior: float = 10.0,
) -> FeatureEncoder:
    """The encoder of a training set read as `batches` (every row, the `fit_columns`); `schema`: the table's,
    for the fresh columns it has."""
    users: set[str] = set()
    items: set[str] = set()
    genres: set[str] = set()
    years = Moments()
    clicks, train_rows = 0.0, 0
    vectors = {c: Moments() for c in VECTOR_COLUMNS_ALL if use_llm and c in schema.names}
    for batch in batches:
        fit, train = roles.mask(batch, "fit"), roles.mask(batch, "train")
        users.update(str(u) for u in np.asarray(batch.column("user_id").to_pylist(), dtype=object)[fit])
        items.update(str(i) for i in np.asarray(batch.column("item_id").to_pylist(), dtype=object)[fit])
        genres.update(
            g for s in batch.column("genres").drop_null().to_pylist() for g in str(s).split("|") if g
        )
        year = pc.cast(batch.column("year"), pa.float64()).to_numpy(zero_copy_only=False)
        years.add(year[~np.isnan(year)])
        label = pc.cast(batch.column("label"), pa.float64()).to_numpy(zero_copy_only=False)
        clicks, train_rows = clicks + float(label[train].sum()), train_rows + int(train.sum())
        for col, moments in vectors.items():
            moments.add(present_vectors(batch.column(col), fit))
    mean: dict[str, list[float]] = {}
    std: dict[str, list[float]] = {}
    for col, moments in vectors.items():
        if not moments.n:
            raise UserError(f"no {col} in the training set: are the LLM vectors published and materialized?")
        mean[col], std[col] = moments.mean.tolist(), (moments.std + 1e-6).tolist()
    fresh: list[str] = []
    if "event_count" in schema.names:
        fresh = [*FRESH_COUNTERS]
        if all(c in schema.names for c in (*FRESH_VECTORS, "item_vector")):
            fresh += FRESH_COSINES
    return FeatureEncoder(
        user_ids=sorted(users),
        item_ids=sorted(items),
        genres=sorted(genres),
        year_mean=float(years.mean[0]) if years.n else 0.0,
        year_std=float(years.std[0]) + 1e-6 if years.n else 1.0,
        base_ctr=clicks / train_rows if train_rows else float("nan"),
        prior=prior,
        vec_mean=mean,
        vec_std=std,
        fresh=fresh,
    )


def present_vectors(column: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """(K, D) float64: the vectors of the `rows` (B,) bool that have one (not null, not empty)."""
    picked = column.filter(pa.array(rows))
    picked = picked.filter(pc.and_(pc.is_valid(picked), pc.greater(pc.list_value_length(picked), 0)))
    if not len(picked):
        return np.zeros((0, 0))
    flat = pc.list_flatten(picked).to_numpy(zero_copy_only=False).astype(np.float64)
    return flat.reshape(len(picked), -1)


def input_columns(encoder: FeatureEncoder, schema: pa.Schema) -> list[str]:
    """The columns `encoder.transform` reads, and the label, of those the table has."""
    wanted = ["user_id", "item_id", "year", "genres", "label", *COUNTERS]
    wanted += [*encoder.user_columns, *(["item_vector"] if encoder.vec_dim("item_vector") else [])]
    wanted += encoder.fresh_columns if encoder.fresh else []
    return [c for c in dict.fromkeys(wanted) if c in schema.names]
