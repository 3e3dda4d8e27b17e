"""The MARC layer sweep from a portable bundle, so that it can run on a machine without Spark or Delta.

    # 1. here: Delta tables -> one .npz (ID-side arrays and the states of the chosen layers, float16)
    python bench/marc_sweep.py export --data-dir data/local --layers 2,4,...,30 --out data/sweep/bundle.npz
    # 2. anywhere with torch, numpy, scipy, pyarrow, matplotlib: the sweep -> JSON, table, plots
    python bench/marc_sweep.py run --bundle data/sweep/bundle.npz --out docs
    # 3. here: log the results to MLflow (the project's tracking store)
    python bench/marc_sweep.py log --results docs

`llmfeat eval-compression` runs the same sweep in one process on the Delta tables; this script splits it so
the long part can run on a bigger machine (`texts` and `encode` prepare a bundle there, `import-repr` writes
vectors encoded there into `<entity>_repr`). The MARC settings default to the `marc` section's defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmfeat.models.ctr.data import CtrArrays  # noqa: E402
from llmfeat.models.marc.model import MarcConfig  # noqa: E402
from llmfeat.models.marc.sweep import SweepConfig, Vectors, run_sweep  # noqa: E402
from llmfeat.models.marc.train import compress, fit_marc  # noqa: E402
from llmfeat.models.trainer import TrainConfig  # noqa: E402
from llmfeat.spark_jobs.eval_compression import markdown, plots, to_json  # noqa: E402

log = logging.getLogger("marc_sweep")
ARRAY_FIELDS = (
    "user_keys",
    "item_keys",
    "user_idx",
    "item_idx",
    "label",
    "split",
    "timestamp",
    "dense",
    "warm",
)


def export(data_dir: str, layers: list[int], out: Path) -> None:
    from llmfeat.config import load_settings
    from llmfeat.spark_jobs.eval_compression import load

    settings = load_settings("local", [f"data_dir={data_dir}"])
    a, states, present = load(settings)
    layers = [layer for layer in layers if layer in present] or present
    xs = [states(layer) for layer in layers]
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f: np.asarray(getattr(a, f)) for f in ARRAY_FIELDS}
    arrays["user_keys"] = arrays["user_keys"].astype(str)
    arrays["item_keys"] = arrays["item_keys"].astype(str)
    arrays["split"] = arrays["split"].astype(str)
    np.savez(
        out,
        layers=np.array(layers),
        users=np.stack([u for u, _ in xs], 1).astype(np.float16),  # (U, L, D)
        items=np.stack([i for _, i in xs], 1).astype(np.float16),  # (I, L, D)
        **arrays,
    )
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): layers {layers}")


def export_texts(data_dir: str, out: Path) -> None:
    """The ID-side arrays and the exact item and user texts the encode job would encode (Spark, local[1])."""
    from llmfeat.config import load_settings
    from llmfeat.delta_io import open_tables
    from llmfeat.models.ctr.data import ctr_arrays
    from llmfeat.session import build_session
    from llmfeat.spark_jobs.encode import entity_texts

    settings = load_settings("local", [f"data_dir={data_dir}", "spark.master=local[1]"])
    spark = build_session(settings.spark)
    tables = open_tables(settings, spark)
    a = ctr_arrays(tables.read_arrow("interactions"), tables.read_arrow("users"), tables.read_arrow("items"))
    texts = {}
    for entity, key, keys in (("items", "item_id", a.item_keys), ("users", "user_id", a.user_keys)):
        rows = {r[key]: r["text"] for r in entity_texts(tables, entity, settings.encode).collect()}
        texts[entity] = np.array([rows[k] for k in keys], dtype=str)
    arrays = {f: np.asarray(getattr(a, f)) for f in ARRAY_FIELDS}
    for f in ("user_keys", "item_keys", "split"):
        arrays[f] = arrays[f].astype(str)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, item_texts=texts["items"], user_texts=texts["users"], **arrays)
    print(f"wrote {out}: {len(texts['items'])} item and {len(texts['users'])} user texts")


def encode_bundle(texts: Path, gguf: Path, layers: list[int], out: Path) -> None:
    """Add the states of `layers` (project encoder, mean pooling, per-vector L2, fp32 on the GPU if any)."""
    import torch

    from llmfeat.models.encoder import EncoderConfig, ModelSource, convert_gguf, load_encoder

    target = out.parent / "model"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = load_encoder(ModelSource(target, gguf.stem.lower()), EncoderConfig(layers=tuple(layers)), device)
    enc.model.float()  # fp32 like the CPU path, not the GPU default bf16
    z = dict(np.load(texts, allow_pickle=False))
    started = time.monotonic()
    users = enc.encode(list(z.pop("user_texts"))).vectors  # (U, L, D)
    items = enc.encode(list(z.pop("item_texts"))).vectors  # (I, L, D)
    print(f"encoded {len(users) + len(items)} texts at layers {layers} in {time.monotonic() - started:.0f} s")
    np.savez(
        out, layers=np.array(layers), users=users.astype(np.float16), items=items.astype(np.float16), **z
    )


def import_repr(vectors: Path, texts: Path, entity: str, data_dir: str) -> None:
    """Write vectors encoded elsewhere by the project's encoder into `<entity>_repr`, in the encode job's row
    format and lineage (content hash of the same text), so the encode job counts them as current."""
    import hashlib
    from datetime import UTC, datetime

    import pyarrow as pa

    from llmfeat.config import load_settings
    from llmfeat.delta_io import open_tables
    from llmfeat.models.encoder import resolve_model, weights_hash
    from llmfeat.reprs import entity_key, repr_table
    from llmfeat.spark_jobs.encode import Lineage, encoder_config, repr_rows

    settings = load_settings("local", [f"data_dir={data_dir}"])
    source = resolve_model(settings.encode.model, settings.encode.cache_dir)
    pooling = encoder_config(settings.encode).pooling_label
    lineage = Lineage(source.encoder_id, weights_hash(source.path), pooling, settings.encode.max_length)
    z, t = np.load(vectors), np.load(texts)
    keys, layers, v = z["keys"].tolist(), z["layers"].tolist(), z["vectors"].astype(np.float32)  # (N, L, D)
    text_of = dict(zip(t[f"{entity[:-1]}_keys"].tolist(), t[f"{entity[:-1]}_texts"].tolist(), strict=True))
    hashes = [hashlib.sha256(text_of[k].encode()).hexdigest()[:16] for k in keys]
    n, n_layers = len(keys), len(layers)
    encoded = pa.table(
        {
            entity_key(entity): pa.array(np.repeat(keys, n_layers).tolist(), pa.string()),
            "layer": pa.array(np.tile(layers, n), pa.int32()),
            "vector": pa.array(list(v.reshape(n * n_layers, -1)), pa.list_(pa.float32())),
            "content_hash": pa.array(np.repeat(hashes, n_layers).tolist(), pa.string()),
        }
    )
    rows = repr_rows(encoded, entity_key(entity), lineage, datetime.now(UTC))
    version = open_tables(settings).upsert(repr_table(entity), rows, [entity_key(entity), "layer"])
    print(f"{entity}_repr version {version}: {n} keys x layers {layers} ({lineage})")


def load_bundle(path: Path) -> tuple[CtrArrays, dict[int, Vectors], list[int]]:
    z = np.load(path, allow_pickle=False)
    a = CtrArrays(
        **{f: z[f].astype(object) if f.endswith("keys") or f == "split" else z[f] for f in ARRAY_FIELDS}
    )
    layers = [int(v) for v in z["layers"]]
    users, items = z["users"].astype(np.float32), z["items"].astype(np.float32)
    states = {layer: (users[:, k], items[:, k]) for k, layer in enumerate(layers)}
    return a, states, layers


def run(bundle: Path, out: Path, seeds: int, marc_layers: tuple[int, ...], threads: int, marc: MarcConfig,
        train: TrainConfig, workers: int = 1) -> None:  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    a, states, layers = load_bundle(bundle)

    def marc_fn(layer: int, d: int) -> Vectors:
        xu, xi = states[layer]
        cfg = MarcConfig(**{**marc.__dict__, "in_dim": xu.shape[1], "out_dim": d})
        started = time.monotonic()
        fit = fit_marc(a, xu, xi, cfg, train)
        log.info("MARC layer %d d %d: valid AUC %.4f in %.0f s", layer, d, fit.history.best_score,
                 time.monotonic() - started)  # fmt: skip
        return compress(fit.compressor("users"), xu), compress(fit.compressor("items"), xi)

    started = time.monotonic()
    result = run_sweep(
        a,
        states.__getitem__,
        layers,
        marc_fn,
        SweepConfig(seeds=seeds, marc_layers=marc_layers, workers=workers),
    )
    out.mkdir(parents=True, exist_ok=True)
    record = to_json(result) | {"seconds": time.monotonic() - started, "marc_config": marc.__dict__}
    (out / "marc_results.json").write_text(json.dumps(record, indent=1))
    (out / "marc_results.md").write_text(markdown(result))
    plots(result, out)
    print(markdown(result))


def log_results(results: Path, config: str) -> None:
    import mlflow

    from llmfeat.config import load_settings
    from llmfeat.registry import use_tracking

    settings = load_settings(config)
    use_tracking(settings, settings.marc.experiment)
    record = json.loads((results / "marc_results.json").read_text())
    with mlflow.start_run(run_name="compression-eval") as run:
        mlflow.set_tag("kind", "compression-eval")
        mlflow.log_params({"best_layer": record["best_layer"], "final_layer": record["final_layer"]})
        for e in record["table"]:
            mlflow.log_metric(f"test_auc.{e['method']}.{e['dtype']}", e["auc_all"][0])
        for key in ("layer_raw", "layer_pca"):
            for e in record[key]:
                mlflow.log_metric(f"test_auc_by_layer.{key}", e["auc_all"][0], step=e["layer"])
        for name in ("marc_results.json", "marc_results.md", "marc_layers.png", "marc_bytes.png"):
            mlflow.log_artifact(str(results / name))
    print(f"logged to MLflow run {run.info.run_id}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="marc_sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--data-dir", default="data/local")
    e.add_argument("--layers", default="")
    e.add_argument("--out", type=Path, default=Path("data/sweep/bundle.npz"))
    r = sub.add_parser("run")
    r.add_argument("--bundle", type=Path, default=Path("data/sweep/bundle.npz"))
    r.add_argument("--out", type=Path, default=Path("docs"))
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--marc-layers", default="")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--keep-weight", type=float, default=0.1)
    r.add_argument("--indep-weight", type=float, default=0.1)
    r.add_argument("--max-epochs", type=int, default=30)
    t = sub.add_parser("texts")
    t.add_argument("--data-dir", default="data/local")
    t.add_argument("--out", type=Path, default=Path("data/sweep/texts.npz"))
    en = sub.add_parser("encode")
    en.add_argument("--texts", type=Path, default=Path("data/sweep/texts.npz"))
    en.add_argument("--gguf", type=Path, required=True)
    en.add_argument("--layers", default=",".join(str(v) for v in range(2, 31, 2)))
    en.add_argument("--out", type=Path, default=Path("data/sweep/bundle.npz"))
    im = sub.add_parser("import-repr")
    im.add_argument("--vectors", type=Path, required=True)
    im.add_argument("--texts", type=Path, default=Path("data/sweep/texts.npz"))
    im.add_argument("--entity", choices=["users", "items"], required=True)
    im.add_argument("--data-dir", default="data/local")
    lg = sub.add_parser("log")
    lg.add_argument("--results", type=Path, default=Path("docs"))
    lg.add_argument("--config", default="local")
    args = p.parse_args(argv)
    if args.cmd == "texts":
        export_texts(args.data_dir, args.out)
    elif args.cmd == "encode":
        encode_bundle(args.texts, args.gguf, [int(v) for v in args.layers.split(",")], args.out)
    elif args.cmd == "import-repr":
        import_repr(args.vectors, args.texts, args.entity, args.data_dir)
    elif args.cmd == "export":
        export(args.data_dir, [int(v) for v in args.layers.split(",") if v], args.out)
    elif args.cmd == "run":
        ints = tuple(int(v) for v in args.marc_layers.split(",") if v)
        marc = MarcConfig(keep_weight=args.keep_weight, indep_weight=args.indep_weight)
        train = TrainConfig(
            lr=2e-3, weight_decay=1e-5, batch_size=512, max_epochs=args.max_epochs, patience=4
        )
        run(args.bundle, args.out, args.seeds, ints, args.threads, marc, train, args.workers)
    else:
        log_results(args.results, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
