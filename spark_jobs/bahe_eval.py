"""BAHE against the non-hierarchical baseline: quality on the fixed protocol, and cost.

    llmfeat bahe evaluate [--baseline-scope eval|all] [--seeds 3] [--out PATH]

Baseline: each user's whole text (demographics + behaviours before the cut, spark_jobs/user_text.py) encoded
by the full LLM (all blocks; layers 15 and 30 tapped in the same pass). BAHE: the published user vector at
the same cut. Both go through the same protocol (models/evaluation/probe_eval.py): the ID model on train,
the fixed probe on valid (user vector + ID side, no item vector), AUC / GAUC / LogLoss on test, overall, warm
and cold, over seeds.

Cost, each phase in a fresh process on the same CPU threads (wall time, peak resident memory, LLM tokens):
baseline encoding, BAHE behaviour encoding, BAHE training. `eval` scope encodes the users that have valid or
test rows (the only ones the metrics read) and extrapolates the baseline's cost to every user by their token
counts; `all` encodes everyone. Behaviour encoding is timed on a sample of `behavior_sample` texts and
extrapolated by tokens the same way. The projection to a day of 50M records uses the GPU throughput given in
`Throughput`."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llmfeat.models.ctr.data import CtrArrays


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
    """One H100, measured in docs/benchmarks.md (LayerEncoder, bf16, SmolLM2-135M shape), real tokens/s."""

    # user texts (mean 299 tokens), forward through all 30 blocks: the baseline's pass
    baseline_tokens_per_s: float = 535_000.0
    # item texts (mean 17 tokens, like behaviour texts) stopped at block 15; a pass stopped at block 10 is
    # cheaper, so this rate overstates BAHE's encode cost
    behavior_tokens_per_s: float = 564_000.0


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


def encode_texts(
    model_dir: str, layers: tuple[int, ...], texts: list[str], max_length: int
) -> dict[str, Any]:
    """Child body: the executor-side encoder over texts; vectors (N, L, H), token counts (N,)."""
    import torch

    from llmfeat.models.encoder import EncoderConfig, ModelSource, load_encoder

    cfg = EncoderConfig(layers=layers, max_length=max_length, log_every_s=60.0)
    enc = load_encoder(ModelSource(__import__("pathlib").Path(model_dir), "eval"), cfg, torch.device("cpu"))
    out = enc.encode(texts)
    return {"vectors": out.vectors, "lengths": out.lengths, "encode_seconds": out.seconds}


def count_tokens(model_dir: str, texts: list[str], max_length: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def train_bahe_child(settings_doc: dict[str, Any]) -> dict[str, Any]:
    """Child body: load the tables (no Spark), train BAHE, return the user vectors and training stats."""
    from llmfeat.config import Settings
    from llmfeat.models.bahe.train import user_vectors
    from llmfeat.spark_jobs.bahe_fit import load_inputs, train

    settings = Settings.model_validate(settings_doc)
    inputs = load_inputs(None, settings)
    fit = train(settings, inputs)
    return {
        "vectors": user_vectors(fit.model, inputs.seqs, settings.bahe.position_budget),
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


def daily_projection(
    records: float,
    user_tokens_per_record: float,
    behavior_tokens_per_record: float,
    depth: int,
    split: int,
    tp: Throughput,
) -> dict[str, float]:
    """Tokens and H100-hours per day. Baseline: every record re-encodes its user's whole text through all
    blocks (the text changes with each new behaviour). BAHE: a record adds at most one behaviour, encoded
    once through the first `split` blocks (the behaviour table re-uses every text already seen)."""
    base_tokens = records * user_tokens_per_record
    bahe_tokens = records * behavior_tokens_per_record
    base_hours = base_tokens / tp.baseline_tokens_per_s / 3600
    bahe_hours = bahe_tokens / tp.behavior_tokens_per_s / 3600
    return {
        "records": records,
        "baseline_tokens": base_tokens,
        "bahe_tokens": bahe_tokens,
        "baseline_layer_tokens": base_tokens * depth,
        "bahe_layer_tokens": bahe_tokens * split,
        "baseline_h100_hours": base_hours,
        "bahe_h100_hours": bahe_hours,
        "baseline_tokens_per_s": tp.baseline_tokens_per_s,
        "bahe_tokens_per_s": tp.behavior_tokens_per_s,
    }


__all__ = ["Cost", "Throughput", "daily_projection", "fill_unencoded", "in_process", "probe_metrics"]


# ---------------------------------------------------------------------------------------------- the run


def user_texts_py(tables: Any, settings: Any, cut: Any, user_keys: np.ndarray) -> list[str]:
    """The baseline's user texts in user order, built as the encode job builds them (spark_jobs/user_text)."""
    import pyarrow.compute as pc

    from llmfeat.spark_jobs.user_text import user_text

    users = {r["user_id"]: r for r in tables.read_arrow("users").to_pylist()}
    ub = tables.read_arrow("user_behaviors")
    texts = dict(
        zip(*[tables.read_arrow("behaviors")[c].to_pylist() for c in ("behavior_id", "text")], strict=True)
    )
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
    from llmfeat.models.encoder import model_depth, resolve_model
    from llmfeat.models.evaluation.probe_eval import ProtocolConfig, fit_id_model
    from llmfeat.spark_jobs.bahe_fit import cut_time

    cache = Path(settings.data_dir) / "bahe_eval"
    tables = open_tables(settings)
    a = ctr_arrays(tables.read_arrow("interactions"), tables.read_arrow("users"), tables.read_arrow("items"))
    cut = cut_time(None, tables, settings.bahe.history_cut)
    source = resolve_model(settings.encode.model, settings.encode.cache_dir)
    path, depth, split, max_len = str(source.path), model_depth(source.path), settings.bahe.split_layer, 512
    texts = user_texts_py(tables, settings, cut, a.user_keys)
    user_tokens = count_tokens(path, texts, max_len)  # (U,)
    in_eval = np.zeros(len(a.user_keys), bool)
    in_eval[a.user_idx[a.split != "train"]] = True
    scope_users = np.flatnonzero(in_eval) if scope == "eval" else np.arange(len(a.user_keys))

    def baseline() -> tuple[dict[str, Any], float, float]:
        return in_process(encode_texts, path, (15, depth), [texts[u] for u in scope_users], max_len)

    base, base_s, base_mb = cached(cache / f"baseline-{scope}.pkl", fresh, baseline)
    b_texts = tables.read_arrow("behaviors")["text"].to_pylist()
    b_tokens = count_tokens(path, b_texts, max_len)
    sample = sorted(np.random.default_rng(0).choice(len(b_texts), min(behavior_sample, len(b_texts)), False))

    def behaviours() -> tuple[dict[str, Any], float, float]:
        return in_process(encode_texts, path, (split,), [b_texts[i] for i in sample], max_len)

    beh, beh_s, beh_mb = cached(cache / f"behaviors-{behavior_sample}.pkl", fresh, behaviours)
    trained, train_s, train_mb = cached(
        cache / "train.pkl", fresh, lambda: in_process(train_bahe_child, settings.model_dump())
    )
    ids = [fit_id_model(a, ProtocolConfig(), seed=s) for s in range(seeds)]
    v_base = np.zeros((len(a.user_keys), base["vectors"].shape[-1], 2), np.float32)
    v_base[scope_users] = base["vectors"].transpose(0, 2, 1)
    quality = {
        "id_only": probe_metrics(a, np.zeros((len(a.user_keys), 0), np.float32), seeds, ids),
        "baseline_l30": probe_metrics(a, fill_unencoded(v_base[..., 1], in_eval), seeds, ids),
        "baseline_l15": probe_metrics(a, fill_unencoded(v_base[..., 0], in_eval), seeds, ids),
        "bahe": probe_metrics(a, trained["vectors"], seeds, ids),
    }
    scope_tokens = int(base["lengths"].sum())
    base_rate = scope_tokens / base["encode_seconds"]
    beh_rate = int(beh["lengths"].sum()) / beh["encode_seconds"]
    costs = [
        Cost("baseline_measured", len(scope_users), scope_tokens, depth, base_s, base_mb),
        Cost("baseline_all_users", len(texts), int(user_tokens.sum()), depth,
             base_s - base["encode_seconds"] + user_tokens.sum() / base_rate, base_mb),
        Cost("behaviors_measured", len(sample), int(beh["lengths"].sum()), split, beh_s, beh_mb),
        Cost("behaviors_all", len(b_texts), int(b_tokens.sum()), split,
             beh_s - beh["encode_seconds"] + b_tokens.sum() / beh_rate, beh_mb),
        Cost("bahe_train", 0, 0, 0, train_s, train_mb),
    ]  # fmt: skip
    history = np.array(["History" in t for t in texts])  # users with behaviours before the cut
    per_record = float(user_tokens[history].mean()), float(b_tokens.mean())
    projection = daily_projection(50e6, *per_record, depth, split, Throughput())
    return {
        "scope": scope,
        "seeds": seeds,
        "users_encoded": len(scope_users),
        "test_rows": int((a.split == "test").sum()),
        "test_warm_rows": int(a.warm[a.split == "test"].sum()),
        "quality": quality,
        "costs": {c.phase: asdict(c) | {"layer_tokens": c.layer_tokens} for c in costs},
        "training": {k: v for k, v in trained.items() if k not in ("vectors", "no_history")},
        "bahe_no_history_users": int(trained["no_history"].sum()),
        "throughput_cpu_tokens_per_s": {"baseline": base_rate, "behaviors": beh_rate},
        "mean_tokens": {"user_text_with_history": per_record[0], "behavior_text": per_record[1]},
        "projection": projection,
    }


def format_report(r: dict[str, Any]) -> str:
    """Markdown tables: quality (test AUC / GAUC / LogLoss, all, warm, cold) and cost."""
    names = {
        "id_only": "ID model only",
        "baseline_l30": "baseline: full LLM, user text, layer 30",
        "baseline_l15": "baseline: full LLM pass, user text, layer 15",
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
    lines += ["", "| phase | texts | LLM tokens | blocks | token x blocks | wall s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in r["costs"].values():
        lines.append(
            f"| {c['phase']} | {c['texts']:,} | {c['tokens']:,} | {c['layers']} | {c['layer_tokens']:,} | "
            f"{c['seconds']:.0f} | {c['peak_rss_mb']:.0f} |"
        )
    p = r["projection"]
    lines += [
        "",
        f"50M records/day: baseline {p['baseline_tokens']:.3g} tokens through all blocks = "
        f"{p['baseline_h100_hours']:.1f} H100-hours; BAHE {p['bahe_tokens']:.3g} tokens through the split "
        f"blocks = {p['bahe_h100_hours']:.2f} H100-hours (upper bound: one new behaviour per record)",
    ]
    return "\n".join(lines)
