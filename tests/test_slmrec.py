"""SLMRec student: block points, student = teacher's first blocks, block-boundary states equal the encoder's
(un-normalised), the loss on those states, distillation with full tuning and LoRA, and the saved folder
loading as an encoder (tiny random Llama, word-level tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_encoder import TEXTS, make_tiny_model_dir, tiny_llama, tiny_tokenizer

from llmfeat.config import Settings, load_settings
from llmfeat.models.encoder import EncoderConfig, LayerEncoder, load_encoder, resolve_model
from llmfeat.models.slmrec.model import (
    BlockStates,
    StudentConfig,
    add_lora,
    block_points,
    distillation_loss,
    make_student,
    merge_lora,
)
from llmfeat.spark_jobs.distil_student import DistilTexts, padded, text_tokens

pytestmark = pytest.mark.unit


def test_block_points_and_config_checks() -> None:
    assert block_points(15, 4) == (4, 8, 11, 15)
    assert block_points(8, 4) == (2, 4, 6, 8)
    assert block_points(3, 1) == (3,)
    with pytest.raises(ValueError, match="student_layers"):
        StudentConfig(student_layers=15, teacher_layer=15)
    with pytest.raises(ValueError, match="blocks"):
        StudentConfig(student_layers=2, teacher_layer=4, blocks=3)


def test_student_keeps_first_blocks_and_taps_match_the_encoder() -> None:
    teacher = tiny_llama()
    student = make_student(teacher, 2)
    assert len(student.layers) == 2 and student.config.num_hidden_layers == 2
    assert len(teacher.layers) == 4  # the teacher is untouched
    assert torch.equal(student.layers[1].mlp.up_proj.weight, teacher.layers[1].mlp.up_proj.weight)
    tok = tiny_tokenizer()
    for pooling in ("mean", "last"):
        # the student's last layer gets the final norm, as the encoder applies it at a model's top block
        ref = LayerEncoder(make_student(teacher, 2), tok, EncoderConfig(layers=(1, 2), pooling=pooling,
                           normalize="none"), torch.device("cpu"))  # fmt: skip
        want = ref.encode(TEXTS).vectors  # (N, 2, H)
        taps = BlockStates(make_student(teacher, 2), (1, 2), pooling)
        ids, _ = ref.tokenize(TEXTS)
        x, mask = padded(ids, tok.pad_token_id)
        with torch.no_grad():
            got = taps(x, mask).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_distillation_loss_is_zero_at_the_target_and_positive_elsewhere() -> None:
    t = 50 * torch.randn(3, 2, 8)  # raw hidden states: norms far from 1
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-4)
    s = 50 * torch.randn(3, 2, 8)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    want = ((1 - cos) + 0.1 * (s - t).norm(dim=-1)).sum(1).mean()
    assert distillation_loss(s, t).item() == pytest.approx(want.item())


def test_loss_on_block_boundary_states_of_teacher_and_student() -> None:
    """Teacher M = 3 of 4 blocks, student N = 2, K = 2: points (2, 3) <- (1, 2); last-token raw states."""
    teacher = tiny_llama()
    cfg = StudentConfig(student_layers=2, teacher_layer=3, blocks=2)
    assert cfg.teacher_points == (2, 3) and cfg.student_points == (1, 2) and cfg.pooling == "last"
    student = make_student(teacher, cfg.student_layers)
    ids, _ = LayerEncoder(make_student(teacher, 2), tiny_tokenizer(), EncoderConfig(layers=(1,)),
                          torch.device("cpu")).tokenize(TEXTS)  # fmt: skip
    x, mask = padded(ids, 0)
    taps = BlockStates(teacher, cfg.teacher_points)
    calls: list[int] = []
    above = teacher.layers[3].register_forward_hook(lambda *_: calls.append(4))
    with torch.no_grad():
        t = taps(x, mask)  # (B, K, H)
    assert calls == []  # the forward stopped after block 3: block 4 never ran
    taps.remove()
    above.remove()
    for i, row in enumerate(ids):  # each text alone, no padding: HF's hidden state after block k, last token
        out = teacher(input_ids=torch.tensor([row]), output_hidden_states=True)
        for j, k in enumerate(cfg.teacher_points):
            torch.testing.assert_close(t[i, j], out.hidden_states[k][0, -1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(t.norm(dim=-1), torch.ones(len(ids), 2), atol=0.1)  # not unit-normalised

    s = BlockStates(student, cfg.student_points)(x, mask)  # with gradients; point 2 gets the final norm
    loss = distillation_loss(s, t, cfg.l2_weight)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)  # (B, K)
    l2 = (s - t).norm(dim=-1)  # (B, K), on the raw states
    assert loss.item() == pytest.approx(((1 - cos) + 0.1 * l2).sum(1).mean().item(), rel=1e-5)
    doubled = distillation_loss(2 * s, 2 * t, cfg.l2_weight)  # the cosine ignores scale, the L2 term does not
    assert (doubled - loss).item() == pytest.approx(0.1 * l2.sum(1).mean().item(), rel=1e-4)
    loss.backward()
    assert student.layers[0].mlp.up_proj.weight.grad is not None and student.norm.weight.grad is not None


def test_lora_starts_at_the_base_trains_few_weights_and_merges() -> None:
    model = make_student(tiny_llama(), 2)
    x, mask = padded([[2, 3, 4], [5, 6]], 0)
    taps = BlockStates(model, (2,), "mean")
    with torch.no_grad():
        base = taps(x, mask).clone()
    total = sum(p.numel() for p in model.parameters())
    trainable = add_lora(model, rank=2, alpha=4.0)
    assert 0 < trainable < total / 4
    with torch.no_grad():
        assert torch.allclose(taps(x, mask), base, atol=1e-6)  # B = 0 at the start
        for p in model.parameters():
            if p.requires_grad and p.shape[1] == 2:  # lora_b
                p.add_(0.01)
        tuned = taps(x, mask).clone()
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(taps(x, mask), tuned, atol=1e-5)


def tiny_slm_settings(tmp_path: Path, teacher: Path, tuning: str) -> Settings:
    return load_settings(
        "tiny",
        [
            f"data_dir={tmp_path / 'lake'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"slmrec.teacher={teacher}",
            "slmrec.layer=4",
            "slmrec.student_layers=2",
            "slmrec.blocks=2",
            f"slmrec.tuning={tuning}",
            "slmrec.lr=0.003",
            "slmrec.steps=30",
            "slmrec.batch_size=8",
            "slmrec.max_length=32",
        ],
    )


def tiny_texts() -> DistilTexts:
    rng = np.random.default_rng(0)
    words = "toy story goldeneye four rooms animation comedy action thriller drama rated 1 2 3 4 5".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(60)]
    entity = np.array(["items", "users", "behaviors"] * 20)
    return DistilTexts(texts, entity, np.arange(60) < 12)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_distil_raises_heldout_cosine_saves_an_encoder_folder_and_logs(tmp_path: Path, tuning: str) -> None:
    import json

    import mlflow

    from llmfeat.spark_jobs.distil_student import run

    teacher = make_tiny_model_dir(tmp_path / "tiny-llama")
    settings = tiny_slm_settings(tmp_path, teacher, tuning)
    assert text_tokens(settings) == 32
    assert text_tokens(load_settings("tiny")) == load_settings("tiny").encode.max_length  # the encode length
    summary = run(None, settings, tiny_texts())
    assert summary.max_length == 32
    assert np.mean(summary.losses[-5:]) < summary.losses[0]
    assert np.mean(list(summary.cosine_after.values())) > np.mean(list(summary.cosine_before.values()))

    folder = Path(summary.folder)
    assert folder.name == "tiny-llama-slmrec-2of4"
    record = json.loads((folder / "slmrec.json").read_text())
    assert record["student"]["teacher_points"] == [2, 4] and record["student"]["student_points"] == [1, 2]
    source = resolve_model(str(folder), "unused")  # what `encode.model=<folder>` does
    enc = load_encoder(source, EncoderConfig(layers=(2,), max_length=32), torch.device("cpu"))
    out = enc.encode(TEXTS)
    assert out.vectors.shape == (len(TEXTS), 1, 32) and np.isfinite(out.vectors).all()

    run_ = mlflow.get_run(summary.run_id)
    assert run_.data.tags["teacher.encoder_id"] == "tiny-llama"
    assert run_.data.tags["student.encoder_id"] == "tiny-llama-slmrec-2of4"
    assert run_.data.params["slmrec.tuning"] == tuning
    assert mlflow.active_run() is None


def test_student_probe_intervals_resample_users() -> None:
    from llmfeat.spark_jobs.eval_student import user_clustered_auc, user_resamples

    users = np.repeat(np.arange(6), 4)  # 6 users, 4 rows each
    for idx in user_resamples(users, 20):
        drawn = users[idx]
        assert len(idx) == 24 and all((drawn == u).sum() % 4 == 0 for u in range(6))  # whole users
    rng = np.random.default_rng(0)
    y = np.tile([0.0, 1.0], 12)
    p = rng.random((2, 24))
    mean, low, high = user_clustered_auc(y, users, p, base=p, n_boot=50)
    assert mean == low == high == 0.0  # a paired difference of a model with itself
    mean, low, high = user_clustered_auc(y, users, p, n_boot=50)
    assert low <= mean <= high
