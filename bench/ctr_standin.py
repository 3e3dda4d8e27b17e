"""CTR demo step on real ML-100k with stand-in vectors, for use before the MARC feature tables are published.

    .venv/bin/python bench/ctr_standin.py [--out /tmp/ctr_real] [--requests 3000]

Copies interactions, items and users from data/local/delta into a separate lake (the shared one is not
touched) and writes user_features / item_features with the compress job's schema:
- item vector: the real SmolLM2 layer-15 item state (items_repr) reduced to 64 dimensions by PCA fitted on
  the items (unsupervised), in place of the trained MARC compressor;
- user vector: the mean of those item vectors over the items the user rated before encode.history_cut (no
  label enters it); a user with no history there gets the mean item vector, so every user is known to the
  store. This is weaker than the real user text (demographics + history) and is labelled as a stand-in.
Then it publishes and materializes them with llmfeat.spark_jobs.materialize and runs the CTR demo step: both
models, the offline comparison, the replayed online A/B through the service, the promotion gate.
"""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmfeat.config import load_settings
from llmfeat.delta_io import RustDelta
from llmfeat.reprs import layer_matrix, repr_table
from llmfeat.spark_jobs import materialize

DIM, LAYER = 64, 15


def vectors_table(key: str, ids: list[str], v: np.ndarray, encoder: str) -> pa.Table:
    n = len(ids)
    now = datetime.now(UTC).replace(microsecond=0)
    values = v.astype(np.float16).astype(np.float32)
    return pa.table(
        {
            key: pa.array(ids, pa.string()),
            "vector": pa.array(list(values), pa.list_(pa.float32())),
            "scale": pa.nulls(n, pa.float32()),
            "event_timestamp": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "source_version": pa.array([0] * n, pa.int64()),
            "encoder_id": pa.array([encoder] * n),
            "layer": pa.array([LAYER] * n, pa.int64()),
            "compressor_name": pa.array(["pca-standin"] * n),
            "compressor_version": pa.array(["0"] * n),
            "dtype": pa.array(["float16"] * n),
        }
    )


def build(out: Path, source: Path) -> None:
    tables = RustDelta(out / "delta")
    for name in ("interactions", "items", "users"):
        shutil.copytree(source / name, out / "delta" / name)
    src = RustDelta(source)
    items = tables.read_arrow("items")["item_id"].to_pylist()
    reprs = src.read_arrow(repr_table("items"))
    x = layer_matrix(reprs, "items", LAYER, np.asarray(items, dtype=object))
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    item_v = x @ vt[:DIM].T
    item_v /= item_v.std()
    encoder = str(reprs["encoder_id"][0])
    tables.write("item_marc_v1_features", vectors_table("item_id", items, item_v, encoder))
    inter = tables.read_arrow("interactions").to_pandas()
    cut = inter.loc[inter["split"] == "valid", "event_timestamp"].min()
    before = inter[inter["event_timestamp"] < cut]
    pos = {k: i for i, k in enumerate(items)}
    users = tables.read_arrow("users")["user_id"].to_pylist()
    history = before.groupby("user_id")["item_id"].apply(list).to_dict()
    user_v = np.stack([item_v[[pos[i] for i in history.get(u, items)]].mean(0) for u in users])
    tables.write("user_marc_v1_features", vectors_table("user_id", users, user_v, encoder))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/ctr_real")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    settings = load_settings("local", [f"data_dir={out}", f"abtest.requests={args.requests}"])
    build(out, Path("data/local/delta").resolve())
    materialize.run(None, settings)
    from llmfeat.cli.demo import ctr_step

    ctr_step(settings)


if __name__ == "__main__":
    main()
