"""great-expectations suites as code: one function per suite, each returning a `Suite` the gate runs.

A `Suite` is the GX expectations plus what the gate needs around them: the key columns that name a row in
messages and in quarantine, the derived columns the expectations read (validation/derived.py), and for drift
the previous version the batch is joined with.

    raw tables        items_suite, users_suite, interactions_suite, behaviors_suite, user_behaviors_suite
    representations   repr_suite        (<entity>_repr: dimension, finite, norms, one row per key and layer)
    features          feature_suite     (user_features, item_features: dimension, int8 range, lineage;
                                         also their float32 copies feast_user_llm, feast_item_llm, ...)
    Feast-facing      item_meta_suite, counters_suite (feast_item_meta, feast_user_stats, feast_item_stats)
    candidates        candidates_suite  (user_candidates from Lite-LLM4Rec: k items, k finite scores per user)
    training sets     training_set_suite (label rate, no feature from the future, no state holding the row)
    drift             drift_suite       (two versions of a feature table over the same keys)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.row_conditions import Column

from llmfeat.config import ValidationConf
from llmfeat.reprs import (
    FEATURE_LINEAGE,
    ITEM_STATE_TABLE,
    REPR_LINEAGE,
    REPR_SINGLE_VALUED,
    STATE_LINEAGE,
)
from llmfeat.validation.derived import Derived

DEFAULTS = ValidationConf()
INT8_CODES = (-127, 127)  # symmetric quantisation: -128 is never produced


@dataclass(frozen=True)
class Suite:
    name: str
    keys: tuple[str, ...]
    expectations: tuple[gxe.Expectation, ...]
    derived: tuple[Derived, ...] = ()
    # Turns the batch into the frame the expectations read (drift: joins the previous version).
    prepare: Callable[[Any], Any] | None = field(default=None, compare=False)

    def gx_suite(self) -> gx.ExpectationSuite:
        return gx.ExpectationSuite(
            name=self.name, expectations=[e.copy(deep=True) for e in self.expectations]
        )


def _now_bound(conf: ValidationConf) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=conf.max_clock_skew_s)


def _ids(keys: Sequence[str]) -> list[gxe.Expectation]:
    """Keys present and unique: together for a compound key, so a shared user_id alone is fine."""
    out: list[gxe.Expectation] = [gxe.ExpectColumnValuesToNotBeNull(column=k) for k in keys]
    if len(keys) == 1:
        out.append(gxe.ExpectColumnValuesToBeUnique(column=keys[0]))
    else:
        out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(keys)))
    return out


def _timestamps(column: str, conf: ValidationConf) -> list[gxe.Expectation]:
    """Sane event times: present, not before `earliest_timestamp`, not after now (plus clock skew)."""
    return [
        gxe.ExpectColumnValuesToNotBeNull(column=column),
        gxe.ExpectColumnValuesToBeBetween(
            column=column, min_value=conf.earliest_timestamp, max_value=_now_bound(conf)
        ),
    ]


def items_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    year_max = _now_bound(conf).year + 1
    return Suite(
        "items",
        ("item_id",),
        (
            *_ids(["item_id"]),
            gxe.ExpectColumnValuesToNotBeNull(column="title"),
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeBetween(column="year", min_value=1800, max_value=year_max),
        ),
    )


def users_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    return Suite(
        "users",
        ("user_id",),
        (*_ids(["user_id"]), gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120)),
    )


def interactions_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    lo, hi = conf.label_rate
    return Suite(
        "interactions",
        ("user_id", "item_id", "event_timestamp"),
        (
            *_ids(["user_id", "item_id", "event_timestamp"]),
            *_timestamps("event_timestamp", conf),
            gxe.ExpectColumnValuesToBeBetween(
                column="rating", min_value=conf.rating_range[0], max_value=conf.rating_range[1]
            ),
            gxe.ExpectColumnValuesToNotBeNull(column="rating"),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
            gxe.ExpectColumnMeanToBeBetween(column="label", min_value=lo, max_value=hi),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "valid", "test"]),
        ),
    )


def behaviors_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    return Suite(
        "behaviors",
        ("behavior_id",),
        (*_ids(["behavior_id"]), gxe.ExpectColumnValuesToNotBeNull(column="text")),
    )


def user_behaviors_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    keys = ("user_id", "item_id", "event_timestamp")
    return Suite(
        "user_behaviors",
        keys,
        (
            *_ids(keys),
            gxe.ExpectColumnValuesToNotBeNull(column="behavior_id"),
            *_timestamps("event_timestamp", conf),
        ),
    )


RAW_SUITES: dict[str, Callable[[ValidationConf], Suite]] = {
    "items": items_suite,
    "users": users_suite,
    "interactions": interactions_suite,
    "behaviors": behaviors_suite,
    "user_behaviors": user_behaviors_suite,
}


def raw_suite(table: str, conf: ValidationConf = DEFAULTS) -> Suite:
    """The suite of one ingest table, by name."""
    return RAW_SUITES[table](conf)


def _vector_shape(vector: str, dim: int) -> list[gxe.Expectation]:
    derived_dim, finite = Derived("dim", vector).name, Derived("finite", vector).name
    return [
        gxe.ExpectColumnValuesToNotBeNull(column=vector),
        gxe.ExpectColumnValuesToBeBetween(column=derived_dim, min_value=dim, max_value=dim),
        gxe.ExpectColumnValuesToBeInSet(column=finite, value_set=[True]),
    ]


def repr_suite(
    entity: str,
    key: str,
    width: int,
    norm_bounds: dict[int, tuple[float, float]] | None = None,
    vector: str = "vector",
) -> Suite:
    """`<entity>_repr`: one row per key and layer; width = the encoder's hidden size.

    `norm_bounds` maps layer -> (min, max) L2 norm, taken from a reference run with `norm_bounds_from`;
    per layer because mid layers carry norms about 100x the final layer's.
    """
    norm = Derived("norm", vector)
    by_layer = [
        gxe.ExpectColumnValuesToBeBetween(
            column=norm.name, min_value=lo, max_value=hi, row_condition=Column("layer") == layer
        )
        for layer, (lo, hi) in sorted((norm_bounds or {}).items())
    ]
    return Suite(
        f"{entity}_repr",
        (key, "layer"),
        (
            *_ids([key, "layer"]),
            *_vector_shape(vector, width),
            *by_layer,
            *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REPR_LINEAGE],
            *[
                gxe.ExpectColumnUniqueValueCountToBeBetween(column=c, min_value=1, max_value=1)
                for c in REPR_SINGLE_VALUED
            ],
        ),
        derived=(Derived("dim", vector), Derived("finite", vector), norm),
    )


def feature_suite(
    name: str,
    key: str,
    dim: int,
    dtype: str = "float16",
    vector: str = "vector",
    lineage: Sequence[str] = tuple(FEATURE_LINEAGE),
    conf: ValidationConf = DEFAULTS,
    stored_dtype: bool = True,
    time_key: bool = False,
    compressor_version: str | None = None,
) -> Suite:
    """Compressed feature tables: dimension, finite values, int8 codes in range with a positive scale,
    lineage columns present and single-valued (one encoder, layer and compressor per publication), and, for a
    table of one compressor version (feast_user_marc_v<N>), that version's rows only.

    The Feast-facing copies (feast_user_llm, ...) use it too, with dtype float32 and `stored_dtype=False`:
    their `dtype` lineage column names how the source table stored the vectors, not their own dtype. A time
    series (user snapshots) is keyed by (key, event_timestamp): `time_key`."""
    keys = [key, "event_timestamp"] if time_key else [key]
    derived = [Derived("dim", vector), Derived("finite", vector)]
    checks = [*_ids(keys), *_vector_shape(vector, dim), *_timestamps("event_timestamp", conf)]
    if dtype == "int8":
        lo, hi = INT8_CODES
        derived += [Derived("min", vector), Derived("max", vector)]
        checks += [
            gxe.ExpectColumnValuesToBeBetween(column=Derived("min", vector).name, min_value=lo, max_value=hi),
            gxe.ExpectColumnValuesToBeBetween(column=Derived("max", vector).name, min_value=lo, max_value=hi),
            gxe.ExpectColumnValuesToNotBeNull(column="scale"),
            gxe.ExpectColumnValuesToBeBetween(column="scale", min_value=0, strict_min=True),
        ]
    for col in lineage:
        checks += [
            gxe.ExpectColumnValuesToNotBeNull(column=col),
            gxe.ExpectColumnUniqueValueCountToBeBetween(column=col, min_value=1, max_value=1),
        ]
    if "dtype" in lineage and stored_dtype:
        checks.append(gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=[dtype]))
    if compressor_version is not None:
        checks.append(
            gxe.ExpectColumnValuesToBeInSet(column="compressor_version", value_set=[compressor_version])
        )
    return Suite(name, tuple(keys), tuple(checks), derived=tuple(derived))


def item_meta_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    """feast_item_meta: one row per item with a title; a release year, where known, that is plausible."""
    return Suite(
        "feast_item_meta",
        ("item_id",),
        (
            *_ids(["item_id"]),
            gxe.ExpectColumnValuesToNotBeNull(column="title"),
            gxe.ExpectColumnValuesToBeBetween(column="year", min_value=1800, max_value=_now_bound(conf).year),
            gxe.ExpectColumnValuesToNotBeNull(column="event_timestamp"),
        ),
    )


def counters_suite(prefix: str, key: str, conf: ValidationConf = DEFAULTS) -> Suite:
    """feast_<prefix>_stats: one row per key and day, cumulative impressions >= clicks >= 0."""
    impressions, clicks = f"{prefix}_impressions", f"{prefix}_clicks"
    return Suite(
        f"feast_{prefix}_stats",
        (key, "event_timestamp"),
        (
            *_ids([key, "event_timestamp"]),
            *_timestamps("event_timestamp", conf),
            gxe.ExpectColumnValuesToBeBetween(column=impressions, min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column=clicks, min_value=0),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A=impressions, column_B=clicks, or_equal=True),
        ),
    )


def state_suite(name: str, dim: int, conf: ValidationConf = DEFAULTS) -> Suite:
    """user_state_<representation>_v<N>: one row per user and event time, stamped after its newest event
    (strictly: a row joined at that event's time must not see it), counts consistent, means of width dim
    and finite, one representation and version per table."""
    means = ("liked_mean", "disliked_mean")
    lineage = [
        check
        for c in STATE_LINEAGE
        for check in (
            gxe.ExpectColumnValuesToNotBeNull(column=c),
            gxe.ExpectColumnUniqueValueCountToBeBetween(column=c, min_value=1, max_value=1),
        )
    ]
    return Suite(
        name,
        ("user_id", "event_timestamp"),
        (
            *_ids(["user_id", "event_timestamp"]),
            *_timestamps("event_timestamp", conf),
            *[check for m in means for check in _vector_shape(m, dim)],
            *_stamped_after("newest_event_us"),
            gxe.ExpectColumnValuesToBeBetween(column="event_count", min_value=1),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="event_count", column_B="liked_count", or_equal=True
            ),
            gxe.ExpectColumnValuesToBeBetween(column="like_rate", min_value=0, max_value=1),
            *lineage,
        ),
        derived=(
            *(d for m in means for d in (Derived("dim", m), Derived("finite", m))),
            Derived("micros", "event_timestamp"),
        ),
    )


def _stamped_after(newest_us: str) -> list[gxe.Expectation]:
    """The row's stamp is strictly after the newest event it holds (both in epoch microseconds)."""
    return [
        gxe.ExpectColumnValuesToNotBeNull(column=newest_us),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A=Derived("micros", "event_timestamp").name,
                                                    column_B=newest_us),
    ]  # fmt: skip


def item_state_suite(conf: ValidationConf = DEFAULTS) -> Suite:
    """item_state: one row per item and event time, stamped after its newest event, clicks <= impressions."""
    return Suite(
        ITEM_STATE_TABLE,
        ("item_id", "event_timestamp"),
        (
            *_ids(["item_id", "event_timestamp"]),
            *_timestamps("event_timestamp", conf),
            *_stamped_after("item_newest_event_us"),
            gxe.ExpectColumnValuesToBeBetween(column="item_event_count", min_value=1),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="item_event_count", column_B="item_liked_count", or_equal=True
            ),
        ),
        derived=(Derived("micros", "event_timestamp"),),
    )


def candidates_suite(name: str, k: int, conf: ValidationConf = DEFAULTS) -> Suite:
    """user_candidates (Lite-LLM4Rec): one row per user with k candidate items and k finite scores (an item
    the user already has scores -inf, so a list padded with those fails), from one model run."""
    items, scores = Derived("dim", "candidate_items"), Derived("dim", "candidate_scores")
    finite = Derived("finite", "candidate_scores")
    single = [
        check
        for c in ("model", "run_id")
        for check in (
            gxe.ExpectColumnValuesToNotBeNull(column=c),
            gxe.ExpectColumnUniqueValueCountToBeBetween(column=c, min_value=1, max_value=1),
        )
    ]
    return Suite(
        name,
        ("user_id",),
        (
            *_ids(["user_id"]),
            gxe.ExpectColumnValuesToBeBetween(column=items.name, min_value=k, max_value=k),
            gxe.ExpectColumnValuesToBeBetween(column=scores.name, min_value=k, max_value=k),
            gxe.ExpectColumnValuesToBeInSet(column=finite.name, value_set=[True]),
            *_timestamps("event_timestamp", conf),
            *single,
        ),
        derived=(items, scores, finite),
    )


def training_set_suite(
    feature_timestamps: Sequence[str],
    keys: Sequence[str] = ("user_id", "item_id", "event_timestamp"),
    name: str = "training_set",
    conf: ValidationConf = DEFAULTS,
    strictly_before: Sequence[str] = (),
    newest_events: Sequence[str] = (),
) -> Suite:
    """A point-in-time training set: labels 0/1 at a plausible rate, and no feature newer than its event
    (a missing feature, null timestamp, is allowed: the row had none inside the TTL). Columns named in
    `strictly_before` (e.g. the newest behaviour a user text holds) must precede the event: the row's own
    label must not be in them. `newest_events` are the joined states' newest events in epoch microseconds
    (newest_event_us): each strictly before the row's event_timestamp in microseconds (null: no event yet)."""
    lo, hi = conf.label_rate
    point_in_time = [
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="event_timestamp",
            column_B=ts,
            or_equal=ts not in strictly_before,
            ignore_row_if="either_value_is_missing",
        )
        for ts in feature_timestamps
    ]
    micros = Derived("micros", "event_timestamp")
    states_before = [
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=micros.name, column_B=newest, or_equal=False, ignore_row_if="either_value_is_missing"
        )
        for newest in newest_events
    ]
    return Suite(
        name,
        tuple(keys),
        (
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            gxe.ExpectColumnMeanToBeBetween(column="label", min_value=lo, max_value=hi),
            *_timestamps("event_timestamp", conf),
            *point_in_time,
            *states_before,
        ),
        derived=(micros,) if newest_events else (),
    )


def drift_suite(
    name: str,
    key: str,
    previous: Any,
    vector: str = "vector",
    conf: ValidationConf = DEFAULTS,
) -> Suite:
    """A new version of a feature table against the previous one over the keys both hold: the mean cosine
    similarity stays above `drift_min_mean_cosine` and at most `drift_max_changed_share` of rows changed
    (cosine below `drift_changed_below`). `previous` is the published version (Spark or pandas)."""
    from llmfeat.validation.drift import CHANGED, COSINE, joined_versions

    return Suite(
        f"{name}_drift",
        (key,),
        (
            gxe.ExpectColumnMeanToBeBetween(column=COSINE, min_value=conf.drift_min_mean_cosine),
            gxe.ExpectColumnMeanToBeBetween(column=CHANGED, max_value=conf.drift_max_changed_share),
        ),
        prepare=lambda batch: joined_versions(batch, previous, key, vector, conf.drift_changed_below),
    )
