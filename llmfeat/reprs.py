"""The representation contract: how every table of LLM vectors is named, keyed, stamped and coded.

Two kinds of table carry LLM vectors, and every job and model reads and writes them through this module:
- `<entity>_repr` (the encode job): one row per key and tapped layer, the pooled layer state as float16 values
  (Delta has no half type: float32 numbers exactly representable in float16), with `REPR_LINEAGE`;
- feature tables (the compress job, BAHE): one row per key (user snapshots: per key and time), a small vector
  stored as float16 values or as int8 codes with a per-row float32 `scale` (`encode_vectors`), with
  `FEATURE_LINEAGE`, which the Feast views serve next to the vectors (feature_repo/feature_views.py
  `_lineage`, `feast_<side>_marc_v<N>` copies, the BAHE and behaviour views).

A user snapshot is keyed by `snapshot_id` = "<user_id>@<UTC time to the second>": the user's text holds only
behaviours strictly before that time. The fresh user state (one row per user and event time, built from one
item representation) is named here too (`UserStateView`), so its tables and views follow the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import Column

# ---------------------------------------------------------------------------------------------- names, keys

# user_snapshots: the time series the CTR features use, one text per user and period with new behaviour;
# users: one text per user at encode.history_cut, for the static probes.
ENTITY_KEYS = {
    "items": "item_id",
    "user_snapshots": "snapshot_id",
    "behaviors": "behavior_id",
    "users": "user_id",
}


class ReprError(UserError, ValueError):
    """A representation table that cannot be used as asked: names the table, the key and what is wrong."""


def repr_table(entity: str) -> str:
    """The encode job's table of `entity`, e.g. items_repr."""
    entity_key(entity)  # an unknown entity is named in the error
    return f"{entity}_repr"


def entity_key(entity: str) -> str:
    if entity not in ENTITY_KEYS:
        raise ReprError(f"unknown entity {entity!r}; expected one of {', '.join(ENTITY_KEYS)}")
    return ENTITY_KEYS[entity]


@dataclass(frozen=True)
class MarcView:
    """The names of one MARC compressor version's publication on one side (user snapshots or items); the
    declarations (feature_repo/feature_views.py: user_marc_views, item_marc_views) use the same."""

    side: str  # "user" or "item"
    version: str  # the compressor's registry version

    @property
    def name(self) -> str:
        """The feature view, e.g. user_marc_v1_fv."""
        return f"{self.side}_marc_v{self.version}_fv"

    @property
    def lineage(self) -> str:
        return f"{self.side}_marc_v{self.version}_lineage_fv"

    @property
    def features_table(self) -> str:
        """What the compress job writes, e.g. user_marc_v1_features."""
        return f"{self.side}_marc_v{self.version}_features"

    @property
    def feast_table(self) -> str:
        """Its Feast-facing copy (float32), e.g. feast_user_marc_v1."""
        return f"feast_{self.side}_marc_v{self.version}"

    @property
    def key(self) -> str:
        return f"{self.side}_id"

    @property
    def declaration(self) -> str:
        """The line of feature_repo/feature_views.py that declares it."""
        return f"{self.name}, {self.lineage} = {self.side}_marc_views({self.version})"

    @classmethod
    def parse(cls, view: str) -> MarcView | None:
        """user_marc_v3_fv -> MarcView("user", "3"); None for any other view."""
        found = re.fullmatch(r"(user|item)_marc_v(\d+)_fv", view)
        return cls(found[1], found[2]) if found else None


def marc_views_in(views: Any) -> list[MarcView]:
    """The MARC views among these views (or view names), in order."""
    names = [v if isinstance(v, str) else v.name for v in views]
    return [m for m in map(MarcView.parse, names) if m is not None]


@dataclass(frozen=True)
class UserStateView:
    """The fresh user state built from one item representation (`representation`, e.g. item_marc, at its
    `version`): one row per user and event time, stamped just after its newest event, so a point-in-time
    join gives a row the state of strictly earlier events. Its columns: `USER_STATE_COLUMNS` plus
    `STATE_LINEAGE`."""

    representation: str
    version: str

    @property
    def name(self) -> str:
        return f"user_state_{self.representation}_v{self.version}_fv"

    @property
    def table(self) -> str:
        return f"user_state_{self.representation}_v{self.version}"

    @classmethod
    def parse(cls, view: str) -> UserStateView | None:
        """user_state_item_marc_v1_fv -> UserStateView("item_marc", "1"); None for any other view."""
        found = re.fullmatch(r"user_state_(\w+?)_v(\d+)_fv", view)
        return cls(found[1], found[2]) if found else None


USER_STATE_COLUMNS = (
    "event_count",
    "liked_count",
    "disliked_count",
    "like_rate",  # smoothed toward the fit period's base rate
    "liked_mean",  # mean item vector of the liked items so far
    "disliked_mean",
    "liked_recent_mean",  # the same, each event weighted by recency (state.half_life_s)
    "disliked_recent_mean",
    "liked_recent_weight",  # the recency weights of those means, as of newest_event_us
    "disliked_recent_weight",
    "newest_event_us",  # the newest event the state holds, epoch microseconds (online stores keep seconds
    # for timestamps; ordering pushed events needs the microseconds)
)
STATE_LINEAGE = ("representation", "representation_version", "layer")

# The item's fresh counters, from the same update with no vectors: one row per item and event time, stamped
# just after it. Not tied to a representation: one table and view.
ITEM_STATE_TABLE = "item_state"
ITEM_STATE_VIEW = "item_state_fv"
ITEM_STATE_COLUMNS = ("item_event_count", "item_liked_count", "item_newest_event_us")

# Per side (the state view's entity), the field holding the newest event a state row holds (epoch
# microseconds): a training row may only see a state whose newest event is strictly before it.
NEWEST_EVENT_FIELDS = {"user": "newest_event_us", "item": "item_newest_event_us"}


def state_table(view: str) -> str | None:
    """The Delta table a state view serves (user_state_item_marc_v1_fv -> user_state_item_marc_v1,
    item_state_fv -> item_state); None for any other view."""
    if view == ITEM_STATE_VIEW:
        return ITEM_STATE_TABLE
    user = UserStateView.parse(view)
    return user.table if user else None


# The smoothing each state table was built with (table, base_rate, prior_weight, half_life_s), so the online
# path computes the same numbers.
STATE_PRIOR_TABLE = "state_prior"

# Events pushed online (POST /events, `llmfeat push`), appended here so the next batch run includes them.
EVENTS_TABLE = "pushed_events"
EVENT_COLUMNS = ("event_id", "user_id", "item_id", "label", "event_timestamp")

# ---------------------------------------------------------------------------------------------- snapshot ids

SNAPSHOT_TIME = "%Y-%m-%dT%H:%M:%S"
SNAPSHOT_TIME_SPARK = "yyyy-MM-dd'T'HH:mm:ss"  # the same format in Spark's pattern language


def snapshot_id(user_id: str, at: datetime) -> str:
    """The key of one user snapshot: "<user_id>@<UTC time to the second>" (user_snapshots_repr)."""
    return f"{user_id}@{at.strftime(SNAPSHOT_TIME)}"


def parse_snapshot_id(key: str) -> tuple[str, datetime]:
    """ "u1@1998-01-02T03:04:05" -> ("u1", that UTC time); a user id may itself hold "@"."""
    user_id, sep, at = key.rpartition("@")
    try:
        if not sep:
            raise ValueError
        return user_id, datetime.strptime(at, SNAPSHOT_TIME).replace(tzinfo=UTC)
    except ValueError:
        raise ReprError(f"snapshot_id {key!r}: expected <user_id>@{SNAPSHOT_TIME}") from None


def snapshot_users(keys: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Arrow twin of `parse_snapshot_id`'s user part, for a whole column of snapshot ids."""
    return pc.replace_substring_regex(keys, r"@[^@]*$", "")


def snapshot_id_column(user_id: str | Column, at: str | Column) -> Column:
    """Spark twin of `snapshot_id` (`at` a UTC timestamp column; the session runs in UTC)."""
    from pyspark.sql import functions as F

    return F.concat_ws("@", user_id, F.date_format(at, SNAPSHOT_TIME_SPARK))


def snapshot_parts_columns(key: str | Column = "snapshot_id") -> tuple[Column, Column]:
    """Spark twin of `parse_snapshot_id`: (user_id, snapshot time) columns."""
    from pyspark.sql import functions as F

    at = F.to_timestamp(F.substring_index(key, "@", -1), SNAPSHOT_TIME_SPARK)
    return F.regexp_extract(key, r"^(.*)@[^@]*$", 1), at


# ---------------------------------------------------------------------------------------------- lineage

# Who made a state: one model, its weights and its pooling. Every vector table carries them.
ENCODER_LINEAGE = ("encoder_id", "weights_hash", "pooling")
# `<entity>_repr`: the encoder's lineage (single-valued in a batch, with the token limit), the text's hash.
REPR_SINGLE_VALUED = (*ENCODER_LINEAGE, "max_length")
REPR_LINEAGE = (*REPR_SINGLE_VALUED, "content_hash", "encoded_at")
# What a feature table copies from its source rows, per row.
PASSED_THROUGH = (*ENCODER_LINEAGE, "content_hash")
# One value per publication of a feature table, served by Feast next to the vectors (the *_lineage_fv views).
FEATURE_LINEAGE: dict[str, pa.DataType] = {
    "source_version": pa.int64(),
    "encoder_id": pa.string(),
    "layer": pa.int64(),
    "compressor_name": pa.string(),
    "compressor_version": pa.string(),
    "dtype": pa.string(),
}


# The tags of a registered compressor version: what it was trained on, and its shape.
COMPRESSOR_LINEAGE = ("entity", "encoder_id", "weights_hash", "layer", "pooling", "in_dim", "out_dim")


def layer_lineage(table: pa.Table, name: str, layer: int) -> dict[str, Any]:
    """The single encoder_id / weights_hash / pooling of one layer's rows; mixed values are a ReprError."""
    rows = table.filter(pc.equal(table.column("layer"), layer))
    out: dict[str, Any] = {"layer": layer}
    for col in ENCODER_LINEAGE:
        values = sorted(set(rows.column(col).to_pylist())) if col in rows.column_names else ["unknown"]
        if len(values) != 1:
            raise ReprError(f"{name}: layer {layer} mixes {col} values {values}: re-encode the table first")
        out[col] = values[0]
    return out


# ---------------------------------------------------------------------------------------------- reading


def repr_layers(table: pa.Table) -> list[int]:
    return sorted(set(table.column("layer").to_pylist()))


def layer_matrix(table: pa.Table, entity: str, layer: int, keys: np.ndarray, name: str = "") -> np.ndarray:
    """The (len(keys), D) float32 states of `layer` of an `<entity>_repr` table, in the order of `keys`;
    ReprError names the key and table."""
    name = name or repr_table(entity)
    key_col = entity_key(entity)
    layers = repr_layers(table)
    if layer not in layers:
        raise ReprError(f"{name}: layer {layer} not present (layers in the table: {layers})")
    rows = table.filter(pc.equal(table.column("layer"), layer))
    found = rows.column(key_col).to_pylist()
    pos = {k: i for i, k in enumerate(found)}
    missing = [k for k in keys if k not in pos]
    if missing:
        raise ReprError(
            f"{name}: no layer-{layer} vector for {key_col}={missing[0]!r} ({len(missing)} missing)"
        )
    vectors = rows.column("vector").combine_chunks()
    lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    width = int(np.bincount(lengths).argmax())
    if (lengths != width).any():
        bad = found[int(np.flatnonzero(lengths != width)[0])]
        raise ReprError(f"{name}: {key_col}={bad!r} layer {layer}: vector width differs from {width}")
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    order = [pos[k] for k in keys]
    matrix = flat.reshape(len(found), width)[order]
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = keys[int(np.flatnonzero(~finite)[0])]
        raise ReprError(f"{name}: {key_col}={bad!r} layer {layer}: NaN or inf in the vector")
    return matrix


# ---------------------------------------------------------------------------------------------- codec

VECTOR_DTYPES = ("float16", "int8")
SCALE_BYTES = 4  # an int8 row's float32 scale


def quantise_int8(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int8: z (N, d) -> q (N, d) int8 and scale (N,) float32 with z ~= q * scale."""
    scale = (np.abs(z).max(axis=1) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(z / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantise_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[:, None]


def encode_vectors(z: np.ndarray, dtype: str) -> tuple[pa.ListArray, pa.Array]:
    """(N, d) float vectors -> the stored `vector` list column and its `scale` column (null for float16)."""
    if dtype not in VECTOR_DTYPES:
        raise ReprError(f"unknown vector dtype {dtype!r}; expected one of {', '.join(VECTOR_DTYPES)}")
    n, d = z.shape
    if dtype == "int8":
        q, scale = quantise_int8(z)
        values: pa.Array = pa.array(q.reshape(-1), pa.int8())
        scales = pa.array(scale, pa.float32())
    else:
        values = pa.array(z.astype(np.float16).astype(np.float32).reshape(-1), pa.float32())
        scales = pa.nulls(n, pa.float32())
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values), scales


def decode_vectors(vectors: pa.Array, scale: pa.Array | None, dim: int) -> np.ndarray:
    """The stored list column (and `scale` for int8 codes) -> (N, dim) float32 (NaN stays NaN)."""
    values = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    if pa.types.is_int8(vectors.type.value_type):
        if scale is None:
            raise ReprError("int8 vectors need a float32 `scale` column")
        values = values * scale.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    return values


def vector_rows(batch: pa.RecordBatch, key: str, z: np.ndarray, dtype: str) -> pa.RecordBatch:
    """Source rows (key, encoded_at, `PASSED_THROUGH`) and their (B, d) compressed vectors -> feature-table
    rows: key, vector, scale, event_timestamp and the pass-through lineage."""
    vector, scale = encode_vectors(z, dtype)
    cols = {
        key: batch.column(key),
        "vector": vector,
        "scale": scale,
        "event_timestamp": batch.column("encoded_at"),
    }
    cols |= {c: batch.column(c) for c in PASSED_THROUGH}
    return pa.RecordBatch.from_pydict(cols)
