"""The encoder's GPU-side machinery, checked on the CPU: packs padded to the bucketed shapes that CUDA graphs
replay, and chunks tokenised and packed by several threads ahead of the model, both against the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmfeat.models.encoder import EncoderConfig, LayerEncoder, bucket, pack_inputs
from tests.test_encoder import TEXTS, tiny_llama, tiny_tokenizer


def encoder(**kw: object) -> LayerEncoder:
    cfg = EncoderConfig(**{"layers": (1, 2, 4), "normalize": "none", "max_length": 64, **kw})  # type: ignore[arg-type]
    return LayerEncoder(tiny_llama(), tiny_tokenizer(), cfg, torch.device("cpu"))


@pytest.mark.unit
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_a_pack_to_a_graph_shape_changes_no_vector(pooling: str) -> None:
    enc = encoder(pooling=pooling, pack_width=32)
    ids, _ = enc.tokenize(TEXTS)
    lengths = np.array([len(x) for x in ids])
    flat = np.concatenate([np.array(x) for x in ids])
    starts = np.cumsum(lengths) - lengths
    (pack,) = enc.batches(lengths)
    exact = (pack.rows, pack.width, len(pack.texts))
    padded = (bucket(pack.rows, least=8), pack.width, bucket(len(pack.texts)))  # empty rows and text slots
    assert padded[0] > exact[0] and padded[2] > exact[2]
    with torch.inference_mode():
        got = [
            enc._forward(torch.from_numpy(pack_inputs(flat, starts, lengths, pack, s, 0, 99)), s)
            for s in (exact, padded)
        ]
    np.testing.assert_allclose(got[1][: exact[2]].numpy(), got[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_preparing_chunks_in_threads_gives_the_same_inputs_and_vectors() -> None:
    texts = [f"{t} {i % 5}" for i, t in enumerate(TEXTS * 200)]  # 800 texts in chunks of 100 to 300
    one, three = (
        encoder(tokenize_threads=1, tokenize_chunk=300),
        encoder(tokenize_threads=3, tokenize_chunk=300),
    )
    a, b = list(one._prepared(texts)), list(three._prepared(texts))
    assert [x.where for x in a] == [x.where for x in b] == [slice(0, 300), slice(300, 600), slice(600, 800)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.lengths, y.lengths)
        assert [p[:3] for p in x.packs] == [p[:3] for p in y.packs]
        for p, q in zip(x.packs, y.packs, strict=True):
            assert torch.equal(p[3], q[3])
    np.testing.assert_array_equal(one.encode(texts).vectors, three.encode(texts).vectors)


@pytest.mark.unit
def test_pack_inputs_lay_out_texts_and_empty_slots() -> None:
    enc = encoder(pack_width=8, token_budget=64)
    lengths = np.array([3, 1, 2])
    flat = np.array([11, 12, 13, 21, 31, 32])
    (pack,) = enc.batches(lengths)  # one row of 8: the longest (3), then the shortest that fit (1, 2)
    rows, width, slots = shape = (2, 8, 5)
    got = pack_inputs(flat, np.array([0, 3, 4]), lengths, pack, shape, pad_id=0, dump_row=99)
    ids, positions, slot = got[: 3 * rows * width].reshape(3, rows * width)
    assert ids.tolist() == [11, 12, 13, 21, 31, 32, 0, 0] + [0] * 8
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 0, 0] + [0] * 8
    assert slot.tolist() == [0, 0, 0, 1, 2, 2, 5, 5] + [5] * 8  # padding and the empty row: slot S, dropped
    per_text = got[3 * rows * width :].reshape(3, slots).tolist()
    assert per_text == [
        [3, 1, 2, 1, 1],
        [2, 3, 5, 0, 0],
        [0, 1, 2, 99, 99],
    ]  # lengths, last, row in the chunk
    assert [bucket(x) for x in (1, 64, 65, 1000, 92_700)] == [64, 64, 68, 1024, 94_208]


@pytest.mark.unit
@pytest.mark.parametrize("absurd", [False, True])
def test_token_chunk_gives_tokenize_ids_as_arrays(absurd: bool) -> None:
    enc = encoder(max_length=5)  # texts over 5 tokens are cut, texts over 5 * 32 characters clipped first
    texts = [*TEXTS, "four rooms", *(["toy story " * 40] if absurd else [])]
    ids, truncated = enc.tokenize(texts)
    flat, lengths, cut = enc._token_chunk(texts)
    assert cut.tolist() == truncated.tolist() and cut.any() and not cut.all()
    assert lengths.tolist() == [len(x) for x in ids]
    assert flat.tolist() == [t for x in ids for t in x]
