"""SLMRec on the real SmolLM2-135M weights (packaged GGUF): a short distillation, then the student encodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmfeat.config import load_settings
from llmfeat.models.encoder import EncoderConfig, load_encoder, resolve_model
from llmfeat.spark_jobs.distil_student import DistilTexts

pytestmark = pytest.mark.slow

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller",
    "rated 5: Four Rooms (1995), Thriller",
    "Age 24, gender M, occupation technician. History: rated 4: Star Wars (1977), Action|Sci-Fi",
    "rated 2: Nadja (1994), Drama",
    "Twelve Monkeys (1995). Genres: Drama, Sci-Fi",
]


def test_real_teacher_student_distils_and_encodes(tmp_path: Path) -> None:
    from llmfeat.spark_jobs.distil_student import run

    settings = load_settings(
        "tiny",
        [f"data_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
         "slmrec.layer=4", "slmrec.student_layers=2", "slmrec.blocks=2", "slmrec.steps=3",
         "slmrec.batch_size=3", "slmrec.max_length=32", "slmrec.lr=0.0003"],
    )  # fmt: skip
    texts = DistilTexts(TEXTS, np.array(["items", "items", "behaviors", "users", "behaviors", "items"]),
                        np.array([True, False, True, True, False, False]))  # fmt: skip
    summary = run(None, settings, texts)
    assert Path(summary.folder).name == "smollm2-135m-instruct.q4_1-slmrec-2of4"
    assert all(np.isfinite(summary.losses))
    enc = load_encoder(
        resolve_model(summary.folder, "unused"), EncoderConfig(layers=(2,)), torch.device("cpu")
    )
    out = enc.encode(TEXTS[:2])
    assert out.vectors.shape == (2, 1, 576) and np.allclose(
        np.linalg.norm(out.vectors, axis=-1), 1, atol=1e-4
    )
