"""BAHE against the non-hierarchical baseline: quality on the fixed protocol, and cost, like for like.

    llmfeat bahe evaluate [--scope eval|all] [--seeds 3] [--out PATH]

Baseline: each user's whole text (demographics + behaviours before the cut, llmfeat/user_text.py) encoded
by the LLM up to `bahe.baseline.layer` (15) and no further: the encoder taps that layer only and drops every
block above it (`baseline_encoder_config`). BAHE: the published user vector at the same cut. Both go through
the same protocol (models/evaluation/probe_eval.py): the ID model on train, the fixed probe on valid (user
vector + ID side, no item vector), AUC / GAUC / LogLoss on test, overall, warm and cold, over seeds.

Cost, each phase in a fresh process on the same CPU threads, in the same run (wall time, peak resident
memory, LLM tokens and tokens x blocks), inference against inference and training against training:
- inference: the baseline's pass over the users' texts (blocks 1..baseline_layer) against BAHE's behaviour
  pass (blocks 1..split, each unique behaviour once) plus its deep pass over the same users' behaviour
  sequences (the published vectors, `user_vectors`);
- training: BAHE's deep blocks trained over behaviour sequences (an epoch, forward + backward) against the
  same trainable blocks trained over the same users' token sequences after the frozen blocks 1..split (what
  fine-tuning on whole behaviour texts costs: the paper's baseline), both by `deep_train_cost`; plus BAHE's
  real training run (`bahe_train`).
`eval` scope encodes the users that have valid or test rows (the only ones the metrics read) and extrapolates
to every user by token counts at the measured rate; `all` encodes everyone. Behaviour encoding is timed on a
sample of `behavior_sample` texts and extrapolated by tokens the same way. The daily projection counts changed
user-days (a user with new behaviour that day), at the rates measured in this run (`daily_projection`)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from llmfeat.models.ctr.data import CtrArrays

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings


@dataclass(frozen=True)
class Cost:
    phase: str
    texts: int
    tokens: int  # real tokens through the LLM
    layers: int  # LLM blocks each token went through
    seconds: float  # wall time of the phase in its own process (model load included)
    peak_rss_mb: float

    @property
    def layer_tokens(self) -> int:
        return self.tokens * self.layers


@dataclass(frozen=True)
class Throughput:
    """Rates measured in the same run, on the same machine: tokens (or behaviour positions) per second."""

    baseline_tokens_per_s: float  # user texts through blocks 1..baseline_layer
    behavior_tokens_per_s: float  # behaviour texts through blocks 1..split
    deep_positions_per_s: float  # behaviour positions through the deep blocks (inference)


def baseline_encoder_config(layer: int, max_length: int) -> Any:
    """The like-for-like baseline encoder: taps `layer` only, so the encoder drops every block above it."""
    from llmfeat.models.encoder import EncoderConfig

    return EncoderConfig(layers=(layer,), max_length=max_length, log_every_s=60.0)


# ---------------------------------------------------------------------------------------------- processes


def _child(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch

    torch.set_num_threads(2)
    started = time.monotonic()
    out = fn(*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    queue.put((out, time.monotonic() - started, peak))


def in_process(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Run fn(*args) in a fresh spawned process: (result, wall seconds, peak RSS MiB of that process)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its process (exit {proc.exitcode})")
    return out  # type: ignore[no-any-return]


def encode_texts(model_dir: str, layer: int, texts: list[str], max_length: int) -> dict[str, Any]:
    """Child body: the executor-side encoder over texts, stopped at `layer`; vectors (N, 1, H), token counts
    (N,), the blocks that ran."""
    from pathlib import Path

    import torch

    from llmfeat.models.encoder import ModelSource, decoder_blocks, load_encoder

    cfg = baseline_encoder_config(layer, max_length)
    enc = load_encoder(ModelSource(Path(model_dir), "eval"), cfg, torch.device("cpu"))
    out = enc.encode(texts)
    blocks = len(decoder_blocks(enc.model))
    return {"vectors": out.vectors, "lengths": out.lengths, "encode_seconds": out.seconds, "blocks": blocks}


def deep_train_cost(
    model_dir: str, split: int, deep: int, lengths: list[int], frozen: bool, budget: int = 8192, seed: int = 0
) -> dict[str, Any]:
    """Child body: one epoch of training `deep` LLM blocks (split+1..split+deep, copied from the checkpoint)
    over sequences of the given lengths, forward + backward + AdamW step, batches of at most `budget`
    positions. frozen=False: BAHE (inputs are behaviour vectors from the table); frozen=True: the same blocks
    over token sequences after a no-grad pass through the frozen blocks 1..split (fine-tuning on whole texts).
    Values are random: the cost depends on the shapes only."""
    import copy

    import torch
    from transformers import AutoModel

    from llmfeat.models.bahe.model import llm_blocks
    from llmfeat.models.encoder import progress_bars_on_terminal, truncate_blocks

    torch.manual_seed(seed)
    with progress_bars_on_terminal():
        base = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    shallow = None
    if frozen:
        shallow = copy.deepcopy(base).eval()
        truncate_blocks(shallow, split)
        shallow.norm = torch.nn.Identity()  # the split layer's raw state feeds the deep blocks
    blocks = llm_blocks(base, split, deep).train()
    head = torch.nn.Linear(int(base.config.hidden_size), 1)
    params = [*blocks.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    width, vocab = int(base.config.hidden_size), int(base.config.vocab_size)
    order = np.argsort(lengths)[::-1]
    started, positions = time.monotonic(), 0
    s = 0
    while s < len(order):
        t = int(lengths[order[s]])
        rows = order[s : s + max(1, budget // max(t, 1))]
        mask = torch.arange(t)[None] < torch.tensor([lengths[r] for r in rows])[:, None]  # (B, T)
        if shallow is not None:
            with torch.no_grad():
                ids = torch.randint(0, vocab, (len(rows), t))
                x = shallow(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
        else:
            x = torch.randn(len(rows), t, width)  # (B, T, D) behaviour vectors
        h = blocks(x, mask)  # (B, T, D)
        last = mask.sum(1) - 1
        logit = head(h[torch.arange(len(rows)), last]).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.rand(len(rows)).round())
        opt.zero_grad()
        loss.backward()
        opt.step()
        positions += int(mask.sum())
        s += len(rows)
    return {"seconds": time.monotonic() - started, "positions": positions, "sequences": len(lengths),
            "trainable_parameters": sum(p.numel() for p in params)}  # fmt: skip


def count_tokens(model_dir: str, texts: list[str], max_length: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def train_bahe_child(settings_doc: dict[str, Any]) -> dict[str, Any]:
    """Child body: load the tables (no Spark), train BAHE, return the user vectors and training stats."""
    from llmfeat.config import Settings
    from llmfeat.models.bahe.train import user_vectors
    from llmfeat.spark_jobs.bahe import load_inputs, train

    settings = Settings.model_validate(settings_doc)
    inputs = load_inputs(None, settings)
    fit = train(settings, inputs)
    started = time.monotonic()  # inference: the deep pass over every user's sequence (the published vectors)
    vectors = user_vectors(fit.model, inputs.seqs, settings.bahe.position_budget)
    return {
        "vectors": vectors,
        "user_pass_seconds": time.monotonic() - started,
        "user_pass_positions": int(inputs.seqs.lengths.sum()),
        "sequence_lengths": inputs.seqs.lengths,
        "no_history": inputs.seqs.no_history,
        "valid_auc": fit.history.best_score,
        "best_epoch": fit.history.best_epoch,
        "epochs": len(fit.history.valid_score),
        "positions_per_epoch": fit.positions,
        "rows_per_epoch": fit.rows,
        "trainable_parameters": sum(p.numel() for p in fit.model.parameters() if p.requires_grad),
        "missing": str(inputs.seqs.missing),
    }


# ---------------------------------------------------------------------------------------------- quality


def probe_metrics(
    a: CtrArrays, v_users: np.ndarray, seeds: int, id_logits: list[np.ndarray]
) -> dict[str, Any]:
    """The fixed protocol with user vectors (U, Du) and no item vector: metrics over seeds."""
    from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_probe, split_metrics

    cfg = ProtocolConfig()
    no_items = np.zeros((len(a.item_keys), 0), np.float32)
    preds = np.stack(
        [fit_probe(a, id_logits[s], v_users, no_items, cfg, seed=s).test_pred for s in range(seeds)]
    )
    return {k: asdict(v) for k, v in split_metrics(a, preds, cfg.n_boot).items()}


def fill_unencoded(v: np.ndarray, encoded: np.ndarray) -> np.ndarray:
    """Users never encoded (no valid/test rows) get the mean of the encoded ones: the probe never reads them,
    and per-dimension standardisation stays that of the encoded users."""
    out = v.copy()
    out[~encoded] = v[encoded].mean(0)
    return out


# ---------------------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class UserDays:
    """Per changed user-day (a user with new behaviour that day), means over the data's user-days."""

    user_days: int
    records_per_user_day: float
    user_tokens: float  # the baseline re-encodes that user's whole text (as of the end of that day) once
    new_behavior_tokens: float  # BAHE encodes the behaviour texts never seen before, once
    deep_positions: float  # BAHE re-runs its deep blocks over that user's behaviour sequence


def daily_projection(
    records: float, days: UserDays, baseline_layer: int, split: int, deep: int, tp: Throughput
) -> dict[str, float]:
    """Tokens, tokens x blocks and machine-hours a day at the measured rates, for `records` records a day
    spread over changed user-days as in the data. Baseline: each changed user-day re-encodes the user's whole
    text through blocks 1..baseline_layer. BAHE: the day's new behaviour texts through blocks 1..split, and
    the deep blocks over each changed user's behaviour sequence."""
    user_days = records / days.records_per_user_day
    base_tokens = user_days * days.user_tokens
    beh_tokens = user_days * days.new_behavior_tokens
    deep_positions = user_days * days.deep_positions
    base_s = base_tokens / tp.baseline_tokens_per_s
    bahe_s = beh_tokens / tp.behavior_tokens_per_s + deep_positions / tp.deep_positions_per_s
    return {
        "records": records,
        "changed_user_days": user_days,
        "baseline_tokens": base_tokens,
        "bahe_behavior_tokens": beh_tokens,
        "bahe_deep_positions": deep_positions,
        "baseline_layer_tokens": base_tokens * baseline_layer,
        "bahe_layer_tokens": beh_tokens * split + deep_positions * deep,
        "baseline_hours": base_s / 3600,
        "bahe_hours": bahe_s / 3600,
        "ratio": base_s / bahe_s if bahe_s else float("inf"),
    } | {f"rate_{k}": v for k, v in asdict(tp).items()}


def user_day_stats(histories: Histories, settings: Any, model_dir: str, max_length: int) -> UserDays:
    """Changed user-days of the whole log: their count, records, the baseline's text at the end of each day
    (llmfeat/user_text.py, as the encode job's snapshots), the behaviour texts first seen that day and the
    length of the user's behaviour sequence (at most bahe.max_behaviors)."""
    from datetime import UTC, datetime, timedelta

    from llmfeat.user_text import user_text

    users, texts, ub_table = histories
    ub = ub_table.to_pylist()
    history: dict[str, list[tuple[Any, str]]] = {}
    first_seen: dict[str, Any] = {}
    for r in sorted(ub, key=lambda r: r["event_timestamp"]):
        history.setdefault(r["user_id"], []).append((r["event_timestamp"], texts[r["behavior_id"]]))
        first_seen.setdefault(r["behavior_id"], r["event_timestamp"])
    day_texts, positions = [], []
    for u, events in history.items():
        for day in sorted({t.date() for t, _ in events}):
            end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
            r, enc = users[u], settings.encode
            day_texts.append(user_text(r.get("age"), r.get("gender"), r.get("occupation"), events, end,
                                       enc.user_max_behaviors, enc.user_max_chars))  # fmt: skip
            positions.append(min(sum(t < end for t, _ in events), settings.bahe.max_behaviors))
    n_days = len(day_texts)
    b_ids = list(first_seen)
    b_tokens = count_tokens(model_dir, [texts[b] for b in b_ids], max_length)
    return UserDays(
        user_days=n_days,
        records_per_user_day=len(ub) / n_days,
        user_tokens=float(count_tokens(model_dir, day_texts, max_length).mean()),
        new_behavior_tokens=float(b_tokens.sum() / n_days),  # every behaviour text is new on one day
        deep_positions=float(np.mean(positions)),
    )


__all__ = [
    "Cost", "Throughput", "UserDays", "baseline_encoder_config", "daily_projection", "fill_unencoded",
    "in_process", "probe_metrics",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the run


class Histories(NamedTuple):
    """The sampled users (llmfeat/sample.py) by id, their behaviours' texts by id, their behaviour rows."""

    users: dict[Any, dict]
    texts: dict[Any, str]
    rows: Any  # pyarrow.Table of user_behaviors


def sampled_histories(tables: Any, settings: Any) -> Histories:
    """Read once per evaluation: the baseline texts, the behaviour texts and the user-day counts share it."""
    from llmfeat.sample import Sample

    sample = Sample(tables, settings.sample)
    ub = sample.read("user_behaviors")
    seen = {} if sample.users is None else {"behavior_id": ub.column("behavior_id").unique()}
    behaviours = sample.read("behaviors", ["behavior_id", "text"], **seen)
    texts = dict(zip(*[behaviours[c].to_pylist() for c in ("behavior_id", "text")], strict=True))
    return Histories({r["user_id"]: r for r in sample.read("users").to_pylist()}, texts, ub)


def user_texts_py(histories: Histories, settings: Any, cut: Any, user_keys: np.ndarray) -> list[str]:
    """The baseline's user texts in user order, built as the encode job builds them (llmfeat/user_text.py)."""
    import pyarrow.compute as pc

    from llmfeat.user_text import user_text

    users, texts, ub = histories
    ub = ub.filter(pc.less(ub["event_timestamp"], cut))
    history: dict[str, list[tuple[Any, str]]] = {}
    for u, b, t in zip(
        *[ub[c].to_pylist() for c in ("user_id", "behavior_id", "event_timestamp")], strict=True
    ):
        history.setdefault(u, []).append((t, texts[b]))
    enc = settings.encode
    return [
        user_text(
            users[k].get("age"),
            users[k].get("gender"),
            users[k].get("occupation"),
            history.get(k, []),
            cut,
            enc.user_max_behaviors,
            enc.user_max_chars,
        )  # fmt: skip
        for k in user_keys
    ]


def cached(path: Any, fresh: bool, compute: Callable[[], Any]) -> Any:
    import pickle

    if path.exists() and not fresh:
        return pickle.loads(path.read_bytes())
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    return out


def evaluate(
    settings: Any, scope: str = "eval", seeds: int = 3, behavior_sample: int = 400, fresh: bool = False
) -> dict[str, Any]:
    """Every phase in its own process, cached under <data_dir>/bahe_eval (fresh=True recomputes)."""
    from pathlib import Path

    from llmfeat.delta_io import open_tables
    from llmfeat.models.ctr.data import ctr_arrays
    from llmfeat.models.encoder import resolve_model
    from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_id_model
    from llmfeat.sample import Sample
    from llmfeat.user_text import history_cut_time

    cfg = settings.bahe
    cache = Path(settings.data_dir) / "bahe_eval"
    tables = open_tables(settings)
    a = ctr_arrays(*Sample(tables, settings.sample).ctr_tables())
    cut = history_cut_time(None, tables, cfg.history_cut)
    source = resolve_model(settings.encode.model, settings.encode.cache_dir)
    path, layer, max_len = str(source.path), cfg.baseline.layer, 512
    split, deep = cfg.layer, cfg.deep_layers
    histories = sampled_histories(tables, settings)
    texts = user_texts_py(histories, settings, cut, a.user_keys)
    user_tokens = count_tokens(path, texts, max_len)  # (U,)
    in_eval = np.zeros(len(a.user_keys), bool)
    in_eval[a.user_idx[a.split != "train"]] = True
    scope_users = np.flatnonzero(in_eval) if scope == "eval" else np.arange(len(a.user_keys))

    def baseline() -> tuple[dict[str, Any], float, float]:
        return in_process(encode_texts, path, layer, [texts[u] for u in scope_users], max_len)

    base, base_s, base_mb = cached(cache / f"baseline-{scope}-l{layer}.pkl", fresh, baseline)
    b_texts = list(histories.texts.values())
    b_tokens = count_tokens(path, b_texts, max_len)
    sample = sorted(np.random.default_rng(0).choice(len(b_texts), min(behavior_sample, len(b_texts)), False))

    def behaviours() -> tuple[dict[str, Any], float, float]:
        return in_process(encode_texts, path, split, [b_texts[i] for i in sample], max_len)

    beh, beh_s, beh_mb = cached(cache / f"behaviors-{behavior_sample}.pkl", fresh, behaviours)
    trained, train_s, train_mb = cached(
        cache / "train.pkl", fresh, lambda: in_process(train_bahe_child, settings.model_dump())
    )
    # Training against training: the same trainable blocks, the same users (with history), one epoch each.
    with_history = np.flatnonzero(trained["sequence_lengths"] > 0)
    seq_lengths = [int(x) for x in trained["sequence_lengths"][with_history]]
    tok_lengths = [int(x) for x in user_tokens[with_history]]
    train_bahe, train_bahe_s, train_bahe_mb = cached(
        cache / f"train-cost-bahe-{deep}.pkl", fresh,
        lambda: in_process(deep_train_cost, path, split, deep, seq_lengths, False, cfg.position_budget),
    )  # fmt: skip
    train_base, train_base_s, train_base_mb = cached(
        cache / f"train-cost-tokens-{deep}.pkl", fresh,
        lambda: in_process(deep_train_cost, path, split, deep, tok_lengths, True, cfg.position_budget),
    )  # fmt: skip
    ids = [fit_id_model(a, ProtocolConfig(), seed=s) for s in range(seeds)]
    v_base = np.zeros((len(a.user_keys), base["vectors"].shape[-1]), np.float32)
    v_base[scope_users] = base["vectors"][:, 0]
    quality = {
        "id_only": probe_metrics(a, np.zeros((len(a.user_keys), 0), np.float32), seeds, ids),
        f"baseline_l{layer}": probe_metrics(a, fill_unencoded(v_base, in_eval), seeds, ids),
        "bahe": probe_metrics(a, trained["vectors"], seeds, ids),
    }
    tp = Throughput(
        baseline_tokens_per_s=int(base["lengths"].sum()) / base["encode_seconds"],
        behavior_tokens_per_s=int(beh["lengths"].sum()) / beh["encode_seconds"],
        deep_positions_per_s=trained["user_pass_positions"] / trained["user_pass_seconds"],
    )
    costs = [
        Cost("infer_baseline_measured", len(scope_users), int(base["lengths"].sum()), base["blocks"], base_s,
             base_mb),
        Cost("infer_baseline_all_users", len(texts), int(user_tokens.sum()), base["blocks"],
             base_s - base["encode_seconds"] + user_tokens.sum() / tp.baseline_tokens_per_s, base_mb),
        Cost("infer_behaviors_measured", len(sample), int(beh["lengths"].sum()), beh["blocks"], beh_s,
             beh_mb),
        Cost("infer_behaviors_all", len(b_texts), int(b_tokens.sum()), beh["blocks"],
             beh_s - beh["encode_seconds"] + b_tokens.sum() / tp.behavior_tokens_per_s, beh_mb),
        Cost("infer_bahe_user_pass", len(a.user_keys), trained["user_pass_positions"], deep,
             trained["user_pass_seconds"], train_mb),
        Cost("train_epoch_tokens", len(tok_lengths), train_base["positions"], split + deep,
             train_base["seconds"], train_base_mb),
        Cost("train_epoch_bahe", len(seq_lengths), train_bahe["positions"], deep, train_bahe["seconds"],
             train_bahe_mb),
        Cost("train_bahe_run", 0, 0, deep, train_s, train_mb),
    ]  # fmt: skip
    days = user_day_stats(histories, settings, path, max_len)
    return {
        "scope": scope,
        "seeds": seeds,
        "baseline_layer": layer,
        "baseline_blocks_run": base["blocks"],
        "users_encoded": len(scope_users),
        "test_rows": int((a.split == "test").sum()),
        "test_warm_rows": int(a.warm[a.split == "test"].sum()),
        "quality": quality,
        "costs": {c.phase: asdict(c) | {"layer_tokens": c.layer_tokens} for c in costs},
        "training": {
            k: v for k, v in trained.items() if k not in ("vectors", "no_history", "sequence_lengths")
        }
        | {"epoch_tokens": train_base, "epoch_bahe": train_bahe},
        "bahe_no_history_users": int(trained["no_history"].sum()),
        "throughput": asdict(tp),
        "user_days": asdict(days),
        "projection": daily_projection(50e6, days, layer, split, deep, tp),
    }


def format_report(r: dict[str, Any]) -> str:
    """Markdown tables: quality (test AUC / GAUC / LogLoss, all, warm, cold) and cost."""
    layer = r.get("baseline_layer", 15)
    names = {
        "id_only": "ID model only",
        f"baseline_l{layer}": f"baseline: LLM up to layer {layer} (stops there), user text",
        "bahe": "BAHE user vector",
    }
    lines = [
        "| user vector | AUC all | AUC warm | AUC cold | GAUC all | LogLoss all |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in r["quality"].items():
        cells = [m[k] for k in ("auc_all", "auc_warm", "auc_cold", "gauc_all", "logloss_all")]
        fmt = [f"{c['mean']:.4f} [{c['low']:.4f}, {c['high']:.4f}]" for c in cells]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(fmt) + " |")
    lines += ["", "| phase | texts | LLM tokens (positions) | blocks | token x blocks | s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in r["costs"].values():
        lines.append(
            f"| {c['phase']} | {c['texts']:,} | {c['tokens']:,} | {c['layers']} | {c['layer_tokens']:,} | "
            f"{c['seconds']:.0f} | {c['peak_rss_mb']:.0f} |"
        )
    p = r["projection"]
    lines += [
        "",
        f"50M records/day = {p['changed_user_days']:.3g} changed user-days, at the rates of this run: "
        f"baseline {p['baseline_tokens']:.3g} tokens through {layer} blocks = {p['baseline_hours']:.3g} h; "
        f"BAHE {p['bahe_behavior_tokens']:.3g} new behaviour tokens + {p['bahe_deep_positions']:.3g} deep "
        f"positions = {p['bahe_hours']:.3g} h ({p['ratio']:.1f}x less)",
    ]
    return "\n".join(lines)


def run(
    spark: SparkSession | None,
    settings: Settings,
    scope: str = "eval",
    seeds: int = 3,
    fresh: bool = False,
    out: Path | None = None,
) -> dict[str, Any]:
    """The evaluation (no Spark: each phase in its own process), its JSON written to `out` (default
    <data_dir>/bahe_eval/results.json) and its report printed."""
    import json

    results = evaluate(settings, scope, seeds, fresh=fresh)
    out = out or Path(settings.data_dir) / "bahe_eval" / "results.json"
    out.write_text(json.dumps(results, indent=1, default=float))
    print(format_report(results))
    print(f"results: {out}")
    return results


def eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", choices=["eval", "all"], default="eval", help="baseline users")
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds")
    parser.add_argument("--fresh", action="store_true", help="recompute cached phases")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="bahe-eval")
    config_args(parser)
    eval_args(parser)
    args = parser.parse_args(argv)
    body = lambda s: run(None, s, args.scope, args.seeds, args.fresh, args.out)  # noqa: E731
    return run_in_process("bahe evaluate", args.config, args.overrides, body)


if __name__ == "__main__":
    from llmfeat.spark_jobs.bahe_eval import main as package_main

    sys.exit(package_main())
