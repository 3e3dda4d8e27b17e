"""The layer encoder on a tiny random-weight Llama (4 layers, hidden 32) and a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmfeat.models.encoder import (
    EncoderConfig,
    EncoderError,
    LayerEncoder,
    load_encoder,
    resolve_model,
    select_device,
    weights_hash,
    worker_encoder,
)

WORDS = (
    "toy story goldeneye four rooms genres animation children's comedy action adventure thriller drama "
    "rated user age gender occupation technician writer other history m f none ( ) . , : ; | 1 2 3 4 5"
).split()


def tiny_tokenizer() -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaModel(config).eval()


def make_tiny_model_dir(path: Path) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) holding the tiny random Llama."""
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # type: ignore[attr-defined]
    return path


TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller",
    "Four Rooms",
    "rated 5: Toy Story (1995), Animation|Comedy; rated 3: Four Rooms (1995), Thriller",
]


def encoder(**kw: object) -> LayerEncoder:
    cfg = EncoderConfig(**{"layers": (1, 2, 4), "normalize": "none", "max_length": 64, **kw})  # type: ignore[arg-type]
    return LayerEncoder(tiny_llama(), tiny_tokenizer(), cfg, torch.device("cpu"))


def reference(pooling: str) -> np.ndarray:
    """Full-depth Hugging Face forward, one text at a time, hidden_states[k] pooled: [N, 3, H]."""
    model, tok = tiny_llama(), tiny_tokenizer()
    out = []
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append([hs[k][0].mean(0) if pooling == "mean" else hs[k][0, -1] for k in (1, 2, 4)])
    return np.array([[v.numpy() for v in row] for row in out])


@pytest.mark.unit
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_taps_match_full_forward_one_text_at_a_time(pooling: str) -> None:
    # token_budget 64 forces several packs, tokenize_chunk 3 two tokenisation chunks
    got = encoder(pooling=pooling, token_budget=64, tokenize_chunk=3).encode(TEXTS)
    assert got.vectors.shape == (4, 3, 32)
    np.testing.assert_allclose(got.vectors, reference(pooling), rtol=1e-4, atol=1e-5)
    assert not got.truncated.any()


@pytest.mark.unit
def test_forward_stops_at_deepest_tapped_layer() -> None:
    enc = encoder(layers=(2,))
    assert len(enc.model.layers) == 2  # blocks 3 and 4 are gone, never computed


@pytest.mark.unit
def test_layer_order_follows_config_and_l2_normalises() -> None:
    a = encoder(layers=(4, 1), normalize="l2").encode(TEXTS).vectors
    b = encoder(layers=(1, 4), normalize="l2").encode(TEXTS).vectors
    np.testing.assert_allclose(a[:, 0], b[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
    assert EncoderConfig(normalize="l2").pooling_label == "mean+l2"


@pytest.mark.unit
def test_texts_pack_into_rows_within_the_token_budget() -> None:
    enc = encoder(token_budget=64, max_length=32, pack_width=32)
    lengths = np.array([3, 30, 9, 12, 2])
    (pack,) = enc.batches(lengths)
    assert (pack.width, pack.rows) == (32, 2)
    # row 0: the longest (30) topped up with the shortest (2); row 1: 12, then 3 and 9
    assert pack.texts.tolist() == [1, 4, 3, 0, 2]
    assert pack.row_of.tolist() == [0, 0, 1, 1, 1]
    assert pack.offsets.tolist() == [0, 30, 0, 12, 15]
    assert enc.batches(np.array([5, 3]))[0].width == 8  # a small remainder: one narrow row, not 32 wide


@pytest.mark.unit
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_packed_rows_match_one_text_at_a_time(pooling: str) -> None:
    enc = encoder(pooling=pooling, pack_width=64)
    (pack,) = enc.batches(np.array([len(x) for x in enc.tokenize(TEXTS)[0]]))
    assert pack.rows == 1  # all four texts share one row: only the block-diagonal mask keeps them apart
    np.testing.assert_allclose(enc.encode(TEXTS).vectors, reference(pooling), rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_long_text_truncated_and_counted() -> None:
    long = " ".join(["comedy"] * 5000)
    got = encoder(max_length=16).encode([long, "Four Rooms"])
    assert got.truncated.tolist() == [True, False]
    assert got.tokens == 16 + 2


@pytest.mark.unit
def test_layer_beyond_depth_is_a_clear_error() -> None:
    with pytest.raises(EncoderError, match=r"\[9\] beyond the 4 layers"):
        encoder(layers=(2, 9))
    with pytest.raises(EncoderError, match="count from 1"):
        EncoderConfig(layers=(0, 2))


@pytest.mark.unit
def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    from llmfeat.runner import USER_ERRORS

    with pytest.raises(USER_ERRORS):  # every command reports it as one line, not a traceback
        resolve_model(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(EncoderError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(EncoderError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"), tmp_path)


@pytest.mark.unit
def test_model_folder_loads_once_per_worker(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = make_tiny_model_dir(tmp_path / "tiny")
    source = resolve_model(str(folder), tmp_path / "cache")
    assert source.encoder_id == "tiny" and len(weights_hash(folder)) == 16
    cfg = EncoderConfig(layers=(2, 3), max_length=64)
    first = worker_encoder(source, cfg, torch.device("cpu"))
    assert worker_encoder(source, cfg, torch.device("cpu")) is first
    direct = load_encoder(source, cfg, torch.device("cpu")).encode(TEXTS).vectors
    np.testing.assert_allclose(first.encode(TEXTS).vectors, direct)
    assert "Loading weights" not in capfd.readouterr().err  # no progress bar where stderr is not a terminal


@pytest.mark.unit
def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, why = select_device(["1"])
    assert device.type == "cpu" and "address 1" in why and "falling back to CPU" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert str(select_device(["1"])[0]) == "cuda:1"
    assert str(select_device(None)[0]) == "cuda:0"
    assert str(select_device(["1"], prefer="cpu")[0]) == "cpu"


@pytest.mark.slow
def test_packaged_smollm2_converts_once_and_encodes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(2)
    source = resolve_model("smollm2", tmp_path)
    assert (source.path / "model.safetensors").is_file()
    assert resolve_model("smollm2", tmp_path) == source  # cached: no second conversion
    assert "%|" not in capfd.readouterr().err  # no de-quantising or loading bar: stderr is not a terminal
    cfg = EncoderConfig(layers=(8, 15, 30), normalize="none")
    got = load_encoder(source, cfg, torch.device("cpu")).encode(TEXTS[:2]).vectors
    assert got.shape == (2, 3, 576) and np.isfinite(got).all()
    norms = np.linalg.norm(got, axis=-1).mean(0)
    assert norms[1] > 10 * norms[2]  # the middle layer's huge activations: why normalise per layer


@pytest.mark.unit
def test_tokenize_ignores_padding_left_on_the_shared_tokenizer() -> None:
    enc = encoder()
    before = enc.tokenize(TEXTS)[0]
    enc.tokenizer(TEXTS, padding=True, truncation=True, max_length=4)  # sets both on the shared backend
    assert enc.tokenize(TEXTS)[0] == before == enc.tokenizer(TEXTS)["input_ids"]
