"""Scale benchmark: the pipeline on MovieLens-100k tiled 1x, 10x and 50x, stage by stage.

    .venv/bin/python bench/scale.py --scales 1,10,50 --work /tmp/scale-delta-rs --out docs/scale_results.json
    .venv/bin/python bench/scale.py --backend delta-spark --scales 1,10,50 --work /tmp/scale-delta-spark \
        --out docs/scale_results.json     # the same file: runs are keyed by (stage, scale, backend)

Data: ML-100k (from the installed recbole package) copied `scale` times: copy k renumbers its users and items
and suffixes its titles with k, so every table (users, items, interactions, behaviours, user snapshots) grows
exactly `scale`-fold with ML-100k's own shape (activity, time span, text lengths). The encoder is a tiny
random-weight Llama (4 layers, hidden 64, a word-level tokenizer) so that the LLM does not dominate.

Each stage runs in a fresh Python process, the driver, on `spark.master` local[2]; it reports its wall time
(the job's run(), the session already started), the driver's peak RSS (VmHWM of that process) and, apart,
the JVM's (VmHWM: in local mode the JVM also runs the executors) and the executors' Python workers' (sampled
every 0.2 s, summed). Stages: ingest, encode (items, user_snapshots, behaviors), train (the MARC compressor,
torch in one process on a sample capped by marc.max_fit_rows), compress, publish (the Feast-facing tables,
Spark), state (the event-time user and item state job over the published item vectors), feast (Feast's
materialization to SQLite of the published views, then the state views' newest rows), training_set (the
point-in-time training set of the fresh feature service, joined on the executors and written to Delta) and ctr
(the DNN trained over that table streamed in bounded Arrow batches, one epoch).

Both backends write one results file: a run is keyed by (stage, scale, backend).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "encode", "train", "compress", "publish", "state", "feast", "training_set", "ctr")
ML100K = {"users": 943, "items": 1682}
ID_STRIDE = 10_000  # copy k: user u -> u + k * ID_STRIDE (ML-100k ids are below it)


def make_source(scale: int, out: Path) -> dict[str, str]:
    """ML-100k tiled `scale` times as parquet files in the layout `ingest.source: files` reads."""
    import pandas as pd

    from llmfeat.spark_jobs.ingest import ml100k_source

    src = ml100k_source()
    out.mkdir(parents=True, exist_ok=True)

    def read(path: str) -> pd.DataFrame:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        return df.rename(columns=lambda c: c.split(":")[0])

    inter, items, users = read(src.interactions), read(src.items), read(src.users)
    frames: dict[str, list[pd.DataFrame]] = {"interactions": [], "items": [], "users": []}
    for k in range(scale):
        shift = k * ID_STRIDE
        frames["users"].append(
            pd.DataFrame({
                "user_id": (users["user_id"].astype(int) + shift).astype(str),
                "age": users["age"], "gender": users["gender"], "occupation": users["occupation"],
            })
        )  # fmt: skip
        frames["items"].append(
            pd.DataFrame({
                "item_id": (items["item_id"].astype(int) + shift).astype(str),
                "title": items["movie_title"] + (f" {k}" if k else ""),
                "year": items["release_year"],
                "genres": items["class"].str.replace(" ", "|"),
            })
        )  # fmt: skip
        frames["interactions"].append(
            pd.DataFrame({
                "user_id": (inter["user_id"].astype(int) + shift).astype(str),
                "item_id": (inter["item_id"].astype(int) + shift).astype(str),
                "rating": inter["rating"].astype(float),
                "timestamp": inter["timestamp"].astype(float).astype("int64"),
            })
        )  # fmt: skip
    paths = {}
    for name, parts in frames.items():
        paths[name] = str(out / f"{name}.parquet")
        pd.concat(parts, ignore_index=True).to_parquet(paths[name], index=False)
    return paths


def make_encoder(path: Path) -> Path:
    """A Hugging Face folder with a tiny random Llama and a word-level tokenizer (as the tests' encoder)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    words = (
        "rated history oldest newest age gender occupation technician writer other student educator "
        "engineer programmer m f no yet genres action adventure animation children's comedy crime drama "
        "fantasy horror musical mystery romance sci-fi thriller war western the of a ( ) . , : ; | "
        "0 1 2 3 4 5 6 7 8 9"
    ).split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    LlamaModel(config).eval().save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return path


def overrides(work: Path, scale: int, backend: str = "delta-rs") -> list[str]:
    src = work / f"source-{scale}x"
    return [
        f"data_dir={work / f'lake-{scale}x'}",
        f"delta.backend={backend}",
        "spark.master=local[2]",
        "spark.driver_memory=6g",
        "spark.shuffle_partitions=8",
        "ingest.source=files",
        "ingest.files.format=parquet",
        f"ingest.files.interactions={src / 'interactions.parquet'}",
        f"ingest.files.items={src / 'items.parquet'}",
        f"ingest.files.users={src / 'users.parquet'}",
        f"encode.model={work / 'tiny-llama'}",
        "encode.layers=[1,3]",
        "encode.max_length=64",  # texts cut to 64 tokens: encoding stays minutes at 50x
        "encode.device=cpu",
        "marc.layer=3",
        "marc.hidden_dim=64",
        "marc.task_dim=16",
        "marc.max_epochs=2",
        "marc.max_fit_rows=20000",
        "state.item_version=1",  # the first compressor of the fresh lake
        "ctr.llm_feature_service=ctr_fresh_marc_v1",
        "ctr.id_feature_service=ctr_fresh_id_v1",
        "ctr.kind=dnn",
        "ctr.max_epochs=1",
        "ctr.n_boot=50",
        "ctr.stream=true",
        "ctr.stream_table=training_set_{service}",
    ]


class Watch:
    """Peak RSS of the JVM (VmHWM) and of the executors' Python workers (sampled), children of this driver."""

    def __init__(self) -> None:
        import psutil

        self.me, self.workers_peak, self.jvm_peak, self._stop = psutil.Process(), 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.sample()
            except Exception:  # a process ended while being read
                pass

    def sample(self) -> None:
        for java in (p for p in self.me.children() if p.name() == "java"):
            self.jvm_peak = max(self.jvm_peak, peak_rss(java.pid))
            workers = [p for p in java.children(recursive=True) if p.name().startswith("python")]
            self.workers_peak = max(self.workers_peak, sum(p.memory_info().rss for p in workers))

    def stop(self) -> dict[str, int]:
        self.sample()
        self._stop.set()
        return {"jvm_peak_bytes": self.jvm_peak, "workers_peak_bytes": self.workers_peak}


def peak_rss(pid: int) -> int:
    """A process's peak resident set since it started its program (VmHWM; ru_maxrss would also count the
    memory of the parent it was forked from), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM")).split()[1]) * 1024


def run_stage(stage: str, work: Path, scale: int, backend: str = "delta-rs") -> dict[str, Any]:
    """One stage in this process (the driver): its wall time, its rows, and the peak memories."""
    from llmfeat.config import load_settings
    from llmfeat.session import build_session

    settings = load_settings("local", overrides(work, scale, backend))
    spark = build_session(settings.spark, settings.delta)
    watch = Watch()
    before = peak_rss(os.getpid())
    started = time.monotonic()
    rows = STAGE_FN[stage](spark, settings)
    seconds = time.monotonic() - started
    peak = peak_rss(os.getpid())
    out = {"stage": stage, "scale": scale, "backend": backend, "seconds": seconds, "rows": rows,
           "driver_peak_bytes": peak, "driver_before_bytes": before, **watch.stop()}  # fmt: skip
    spark.stop()
    return out


def _ingest(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.ingest import run

    return sum(s.rows for s in run(spark, settings))


def _encode(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.encode import ALL_ENTITIES, run

    return sum(run(spark, settings, e).encoded for e in ALL_ENTITIES)


def _train(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.train_compressor import run

    run(spark, settings)
    return settings.marc.max_fit_rows


def _compress(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.compress import run

    return sum(s.rows for s in run(spark, settings))


def _publish(spark: Any, settings: Any) -> int:
    from llmfeat.delta_io import open_tables
    from llmfeat.spark_jobs.materialize import publish

    return sum(p.rows for p in publish(spark, open_tables(settings, spark), settings.validation))


def _feast(spark: Any, settings: Any) -> int:
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import apply_repo, feature_views
    from llmfeat.spark_jobs.materialize import (
        materialize,
        materialize_state,
        vector_tables,
        views_on,
    )

    lake = open_tables(settings, spark)
    vectors = [v.target for v in vector_tables(feature_views())]
    names = [*vectors, "feast_item_meta", "feast_user_stats", "feast_item_stats"]
    published = [n for n in names if lake.exists(n)]
    store = apply_repo(settings)
    materialize(store, views_on(published), full=True)
    return sum(p.rows for p in materialize_state(spark, settings, lake, store))


def _state(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.user_state import run

    return run(spark, settings).rows


def _training_set(spark: Any, settings: Any) -> int:
    from llmfeat.spark_jobs.training_set_spark import run

    return sum(run(spark, settings, use_llm=True).rows.values())


def _ctr(spark: Any, settings: Any) -> int:
    import pyarrow.parquet as pq

    from llmfeat.delta_io import open_tables
    from llmfeat.spark_jobs.train_ctr import run, stream_table_files

    run(spark, settings, use_llm=True)
    files = stream_table_files(settings, open_tables(settings), use_llm=True)[2]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # the rows streamed


STAGE_FN = {"ingest": _ingest, "encode": _encode, "train": _train, "compress": _compress,
            "publish": _publish, "state": _state, "feast": _feast, "training_set": _training_set,
            "ctr": _ctr}  # fmt: skip


def machine() -> dict[str, Any]:
    import psutil
    import pyspark

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())  # fmt: skip
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(), "pyspark": pyspark.__version__, "java": java,
            "os": platform.platform()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", default="1,10,50")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmfeat-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale_results.json")
    parser.add_argument("--backend", choices=["delta-rs", "delta-spark"], default="delta-rs")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # the child: one stage, one scale
    parser.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work, args.scale, args.backend)), flush=True)
        return 0
    make_encoder(args.work / "tiny-llama")
    results = json.loads(args.out.read_text()) if args.out.exists() else {"machine": machine(), "runs": []}
    for scale in [int(s) for s in args.scales.split(",")]:
        src = args.work / f"source-{scale}x"
        if not (src / "interactions.parquet").exists():
            make_source(scale, src)
        if args.stages.startswith("ingest"):  # a run from the start begins with an empty lake
            shutil.rmtree(args.work / f"lake-{scale}x", ignore_errors=True)
        for stage in args.stages.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--stage",
                stage,
                "--scale",
                str(scale),
                "--work",
                str(args.work),
                "--backend",
                args.backend,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr[-4000:])
                return done.returncode
            result = json.loads(done.stdout.strip().splitlines()[-1])
            mib = {k: result[f"{k}_peak_bytes"] / 2**20 for k in ("driver", "jvm")}
            print(f"{args.backend} {scale}x {stage}: {result['seconds']:.1f} s, "
                  f"driver {mib['driver']:.0f} MiB, JVM {mib['jvm']:.0f} MiB", flush=True)  # fmt: skip
            key = (scale, stage, args.backend)
            runs = [r for r in results["runs"] if (r["scale"], r["stage"], r["backend"]) != key]
            results["runs"] = [*runs, result]
            results["machine"] = machine()
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
