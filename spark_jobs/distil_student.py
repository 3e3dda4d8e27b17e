"""Distil an SLMRec student encoder from the teacher and save it as a folder that `llmfeat encode` accepts.

    llmfeat distil-student [--config local|PATH] [--set slmrec.student_layers=8 --set slmrec.steps=200 ...]
    llmfeat encode --entity items --set encode.model=<folder> --set encode.layers=[<student_layers>]

Texts: `slmrec.texts_per_entity` item, user and behaviour texts each, as the encode job writes them (user
texts hold the behaviours before the valid split, cut to `encode.user_max_behaviors` and
`encode.user_max_chars`), tokenised up to the encode length (`encode.max_length`, unless `slmrec.max_length`
sets another); `slmrec.holdout` per entity are kept out of training and scored before and after. Teacher
targets (un-normalised states at the K block boundaries, `slmrec.pooling`: last token by default) are computed
once (the teacher is frozen); the student then trains for `slmrec.steps` AdamW steps. Token embeddings stay
frozen; with LoRA the final norm trains too (its scale meets the teacher's raw states at the last point).

The folder: <data_dir>/<slmrec.output_dir>/<teacher id>-slmrec-<N>of<M>/ with config.json, safetensors,
tokenizer files and slmrec.json (teacher id and weights hash, layers, loss, held-out cosines). Its encoder id
in the repr tables is the folder name and its weights hash is that of the saved weights.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import torch

from llmfeat.models.encoder import (
    EncoderConfig,
    LayerEncoder,
    pad_to,
    progress_bars_on_terminal,
    resolve_model,
    weights_hash,
)
from llmfeat.models.slmrec.model import (
    BlockStates,
    StudentConfig,
    add_lora,
    distillation_loss,
    make_student,
    merge_lora,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings, SlmrecConf

log = logging.getLogger("llmfeat.slmrec")
ENTITIES = ("items", "users", "behaviors")


@dataclass(frozen=True)
class DistilTexts:
    texts: list[str]
    entity: np.ndarray  # (N,) str
    holdout: np.ndarray  # (N,) bool


@dataclass
class DistilSummary:
    folder: str
    student_layers: int
    teacher_layer: int
    tuning: str
    steps: int
    trainable: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    max_length: int = 0  # tokens per distillation text
    cosine_before: dict[str, float] = field(default_factory=dict)  # entity -> mean cos at the last point
    cosine_after: dict[str, float] = field(default_factory=dict)
    run_id: str = ""

    def __str__(self) -> str:
        rows = ", ".join(
            f"{e} {self.cosine_before[e]:.4f} -> {self.cosine_after[e]:.4f}" for e in self.cosine_after
        )
        return (
            f"student ({self.student_layers} blocks for teacher layer {self.teacher_layer}, {self.tuning}, "
            f"{self.trainable:,} trainable weights, texts up to {self.max_length} tokens): {self.steps} "
            f"steps in {self.seconds:.0f} s, loss "
            f"{self.losses[0]:.4f} -> {np.mean(self.losses[-20:]):.4f}\n"
            f"  held-out cosine to the teacher (before -> after): {rows}\n"
            f"  saved to {self.folder}  (run {self.run_id})\n"
            f"  use it: llmfeat encode --set encode.model={self.folder} "
            f"--set encode.layers=[{self.student_layers}]"
        )


def student_config(cfg: SlmrecConf, settings: Settings) -> StudentConfig:
    pooling = settings.encode.pooling if cfg.pooling == "encode" else cfg.pooling
    return StudentConfig(
        cfg.student_layers, cfg.layer, cfg.blocks, cfg.l2_weight, pooling, cfg.tuning, cfg.lora_rank,
        cfg.lora_alpha,
    )  # fmt: skip


def text_tokens(settings: Settings) -> int:
    """Tokens per distillation text: `encode.max_length` (what the encode job reads) unless
    `slmrec.max_length` is set."""
    return settings.slmrec.max_length or settings.encode.max_length


# ---------------------------------------------------------------------------------------------- texts


def distillation_texts(settings: Settings) -> DistilTexts:
    """Sampled item, user and behaviour texts from the Delta tables (delta-rs)."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.sample import Sample, scalar
    from llmfeat.user_text import user_text

    cfg, tables = settings.slmrec, RustDelta(settings.delta_root)
    sample = Sample(tables, settings.sample)  # llmfeat/sample.py
    first = scalar(tables, "interactions", "SELECT MIN(event_timestamp) FROM t WHERE split <> 'train'")
    cut = first if first is not None else datetime.max.replace(tzinfo=UTC)
    ub = sample.read("user_behaviors")
    seen = {} if sample.users is None else {"behavior_id": pc.unique(ub.column("behavior_id"))}
    behaviors = {r["behavior_id"]: r["text"] for r in sample.read("behaviors", **seen).to_pylist()}
    per_user: dict[str, list[tuple[datetime, str]]] = {}
    for r in ub.to_pylist():
        per_user.setdefault(r["user_id"], []).append((r["event_timestamp"], behaviors[r["behavior_id"]]))
    users = [
        user_text(u["age"], u["gender"], u["occupation"], per_user.get(u["user_id"], []), cut,
                  settings.encode.user_max_behaviors, settings.encode.user_max_chars)
        for u in sample.read("users").to_pylist()
    ]  # fmt: skip
    pools = {"items": sample.ctr_tables()[2]["text"].to_pylist(), "users": users,
             "behaviors": list(behaviors.values())}  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    texts: list[str] = []
    entity: list[str] = []
    holdout: list[bool] = []
    for name in ENTITIES:
        pool = [t for t in pools[name] if t and t.strip()]
        pick = rng.permutation(len(pool))[: cfg.texts_per_entity]
        n_hold = min(cfg.holdout, len(pick) // 2)
        texts += [pool[i] for i in pick]
        entity += [name] * len(pick)
        holdout += [True] * n_hold + [False] * (len(pick) - n_hold)
    return DistilTexts(texts, np.array(entity), np.array(holdout))


# ---------------------------------------------------------------------------------------------- distillation


def padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids, mask (B, T), right padded to a multiple of 8 (as the encoder does)."""
    t = pad_to(max(len(x) for x in ids))
    batch = torch.full((len(ids), t), pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        batch[row, : len(x)] = torch.tensor(x)
    lengths = torch.tensor([len(x) for x in ids])
    return batch, torch.arange(t)[None] < lengths[:, None]


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_states(
    teacher: Any,
    points: tuple[int, ...],
    pooling: str,
    ids: list[list[int]],
    pad_id: int,
    tokens: int = 16384,
) -> np.ndarray:
    """(N, K, H) un-normalised states of the frozen teacher at its K block boundaries (it stops after the
    deepest), float32 on the teacher's device; texts go in batches of similar length, about `tokens` each."""
    taps = BlockStates(teacher, points, pooling)
    device = device_of(teacher)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out: np.ndarray | None = None
    s = 0
    while s < len(order):
        size = max(1, tokens // pad_to(len(ids[order[min(s + 63, len(order) - 1)]])))
        rows = order[s : s + min(size, 64)]
        x, mask = padded([ids[r] for r in rows], pad_id)
        states = taps(x.to(device), mask.to(device)).cpu().numpy()  # (B, K, H)
        if out is None:
            out = np.empty((len(ids), *states.shape[1:]), np.float32)
        out[rows] = states
        s += len(rows)
    taps.remove()
    assert out is not None
    return out


@torch.no_grad()
def last_point_cosine(taps: BlockStates, ids: list[list[int]], targets: np.ndarray, pad_id: int) -> float:
    """Mean cosine between student and teacher at the last distillation point, over the given texts."""
    cos = []
    device = device_of(taps.model)
    for s in range(0, len(ids), 32):
        x, mask = padded(ids[s : s + 32], pad_id)
        got = taps(x.to(device), mask.to(device))[:, -1].cpu()  # (B, H)
        want = torch.from_numpy(targets[s : s + 32, -1])
        cos.append(torch.nn.functional.cosine_similarity(got, want, dim=-1))
    return float(torch.cat(cos).mean())


def distil(
    student: Any,
    taps: BlockStates,
    ids: list[list[int]],
    targets: np.ndarray,
    train_rows: np.ndarray,
    cfg: SlmrecConf,
    pad_id: int,
) -> list[float]:
    """`cfg.steps` AdamW steps on random batches of train_rows; returns the loss per step."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    device = device_of(student)
    student.train()
    for step in range(cfg.steps):
        rows = rng.choice(train_rows, size=min(cfg.batch_size, len(train_rows)), replace=False)
        x, mask = padded([ids[r] for r in rows], pad_id)
        want = torch.from_numpy(targets[rows]).to(device)  # (B, K, H)
        loss = distillation_loss(taps(x.to(device), mask.to(device)), want, cfg.l2_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == cfg.steps - 1:
            log.info("distil step %d/%d: loss %.4f", step + 1, cfg.steps, losses[-1])
    student.eval()
    return losses


def save_student(student: Any, tokenizer: Any, folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "slmrec.json").write_text(json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- the job


def run(spark: SparkSession | None, settings: Settings, texts: DistilTexts | None = None) -> DistilSummary:
    """Teacher targets -> student (first N blocks) -> distillation -> folder + MLflow run. Runs on a visible
    GPU (float32), else on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    cfg, scfg = settings.slmrec, student_config(settings.slmrec, settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(cfg.teacher, settings.encode.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    with progress_bars_on_terminal():
        teacher = AutoModel.from_pretrained(source.path, dtype=torch.float32).eval()
    student = make_student(teacher, scfg.student_layers)  # copied before the teacher is truncated
    texts = texts or distillation_texts(settings)
    max_length = text_tokens(settings)
    # The encoder's tokenising (cut to max_length, head kept), on a one-block copy: only the tokenizer runs.
    one_block = make_student(teacher, 1)
    tokenize = LayerEncoder(one_block, tokenizer, EncoderConfig(layers=(1,), max_length=max_length),
                            torch.device("cpu")).tokenize  # fmt: skip
    ids, cut = tokenize(texts.texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.monotonic()
    targets = teacher_states(teacher.to(device), scfg.teacher_points, scfg.pooling, ids, pad_id)  # (N, K, H)
    log.info("teacher targets for %d texts (%d cut to %d tokens) in %.0f s on %s", len(ids), int(cut.sum()),
             max_length, time.monotonic() - started, device)  # fmt: skip
    del teacher

    if cfg.tuning == "lora":
        add_lora(student, cfg.lora_rank, cfg.lora_alpha)
        norm: Any = getattr(student, "norm", None)
        if norm is not None:  # the final norm's scale meets the teacher's raw states at the last point
            norm.weight.requires_grad_(True)
    else:
        for name, p in student.named_parameters():
            p.requires_grad_("embed_tokens" not in name)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    student.to(device)
    taps = BlockStates(student, scfg.student_points, scfg.pooling)
    held = {e: np.flatnonzero(texts.holdout & (texts.entity == e)) for e in ENTITIES}
    before = {e: last_point_cosine(taps, [ids[i] for i in r], targets[r], pad_id) for e, r in held.items()}
    started = time.monotonic()
    losses = distil(student, taps, ids, targets, np.flatnonzero(~texts.holdout), cfg, pad_id)
    seconds = time.monotonic() - started
    after = {e: last_point_cosine(taps, [ids[i] for i in r], targets[r], pad_id) for e, r in held.items()}
    if cfg.tuning == "lora":
        merge_lora(student)
    student.cpu()

    root = Path(cfg.output_dir)
    root = root if root.is_absolute() else Path(settings.data_dir) / root
    folder = root / f"{source.encoder_id}-slmrec-{scfg.student_layers}of{scfg.teacher_layer}"
    summary = DistilSummary(str(folder.resolve()), scfg.student_layers, scfg.teacher_layer, cfg.tuning,
                            cfg.steps, trainable, seconds, losses, max_length, before, after)  # fmt: skip
    record = {
        "teacher": {"encoder_id": source.encoder_id, "weights_hash": weights_hash(source.path)},
        "student": asdict(scfg)
        | {"teacher_points": scfg.teacher_points, "student_points": scfg.student_points},
        "distillation": cfg.model_dump()
        | {"texts": len(ids), "max_length": max_length, "seconds": seconds, "final_loss": losses[-1]},
        "heldout_cosine_before": before,
        "heldout_cosine_after": after,
    }
    save_student(student, tokenizer, folder, record)
    summary.run_id = log_run(settings, summary, record, weights_hash(folder))
    return summary


def log_run(settings: Settings, summary: DistilSummary, record: dict[str, Any], student_hash: str) -> str:
    import mlflow

    from llmfeat.registry import use_tracking

    use_tracking(settings, settings.slmrec.experiment)
    with mlflow.start_run(run_name=f"slmrec-{summary.student_layers}of{summary.teacher_layer}") as run:
        mlflow.log_params({f"slmrec.{k}": v for k, v in settings.slmrec.model_dump().items()})
        mlflow.log_params({
            "encode.pooling": settings.encode.pooling, "encode.normalize": settings.encode.normalize,
            "distil.max_length": summary.max_length, "distil.pooling": record["student"]["pooling"],
        })  # fmt: skip
        mlflow.set_tags({
            "kind": "slmrec-student-encoder",
            "teacher.encoder_id": record["teacher"]["encoder_id"],
            "teacher.weights_hash": record["teacher"]["weights_hash"],
            "student.encoder_id": Path(summary.folder).name,
            "student.weights_hash": student_hash,
            "student.folder": summary.folder,
        })  # fmt: skip
        for step, loss in enumerate(summary.losses):
            mlflow.log_metric("distil_loss", loss, step=step)
        for e in summary.cosine_after:
            mlflow.log_metrics({f"heldout_cos_before_{e}": summary.cosine_before[e],
                                f"heldout_cos_after_{e}": summary.cosine_after[e]})  # fmt: skip
        mlflow.log_metrics({"distil_seconds": summary.seconds, "trainable_weights": summary.trainable})
        mlflow.log_dict(record, "slmrec.json")
        return str(run.info.run_id)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="distil-student")
    config_args(parser)
    args = parser.parse_args(argv)

    def body(settings: Settings) -> None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print(run(None, settings), flush=True)

    return run_in_process("distil-student", args.config, args.overrides, body)


if __name__ == "__main__":
    import sys

    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.distil_student import main as package_main

    sys.exit(package_main())
