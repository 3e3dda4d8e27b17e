"""The representation contract's codecs: snapshot ids and stored vectors round-trip; bad input is named."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from llmfeat.reprs import (
    ReprError,
    decode_vectors,
    encode_vectors,
    entity_key,
    parse_snapshot_id,
    repr_table,
    snapshot_id,
    snapshot_users,
)

pytestmark = pytest.mark.unit


def test_snapshot_ids_round_trip_even_when_a_user_id_holds_an_at_sign() -> None:
    at = datetime(1998, 3, 1, 12, 30, 5, tzinfo=UTC)
    key = snapshot_id("a@b", at)
    assert key == "a@b@1998-03-01T12:30:05"
    assert parse_snapshot_id(key) == ("a@b", at)
    assert snapshot_users(pa.array([key, "7@1998-03-01T00:00:00"])).to_pylist() == ["a@b", "7"]
    with pytest.raises(ReprError, match="snapshot_id 'u1'"):
        parse_snapshot_id("u1")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_stored_vectors_decode_to_what_was_encoded(dtype: str) -> None:
    z = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    vectors, scale = encode_vectors(z, dtype)
    assert pa.types.is_int8(vectors.type.value_type) == (dtype == "int8")
    back = decode_vectors(vectors, scale if dtype == "int8" else None, 8)
    np.testing.assert_allclose(back, z, atol=np.abs(z).max() / 127 if dtype == "int8" else 2e-3)


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    assert (repr_table("items"), entity_key("user_snapshots")) == ("items_repr", "snapshot_id")
    with pytest.raises(ReprError, match="unknown entity 'songs'; expected one of items"):
        repr_table("songs")
    with pytest.raises(ReprError, match="unknown vector dtype"):
        encode_vectors(np.zeros((1, 2)), "int4")
    with pytest.raises(ReprError, match="scale"):
        decode_vectors(encode_vectors(np.ones((1, 2)), "int8")[0], None, 2)
