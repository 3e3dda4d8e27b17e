"""Publishing BAHE outputs: user vectors at the cut and PCA-compressed behaviour vectors, in the feature-table
schema of the compress job (spark_jobs/compress.py), each behind the feature-table validation gate."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from llmfeat.config import Settings
from llmfeat.models.bahe.data import BehaviorSequences
from llmfeat.reprs import ENCODER_LINEAGE, repr_table, vector_rows

if TYPE_CHECKING:
    from llmfeat.delta_io import DeltaTables
    from llmfeat.spark_jobs.bahe_fit import BaheInputs

BEHAVIOR_TABLE = repr_table("behaviors")


def sequence_hash(seqs: BehaviorSequences, keys: np.ndarray, u: int) -> str:
    """Content hash of a user's behaviour sequence (ids in order): an unchanged history, an unchanged hash."""
    ids = "\x1f".join(str(keys[b]) for b in seqs.behavior[seqs.user_events(u)])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def feature_rows(
    key: str, ids: list[str], z: np.ndarray, at: datetime | pa.Array, lineage: dict[str, Any], dtype: str
) -> pa.Table:
    """(n, d) vectors -> the feature-table schema the compress job writes (spark_jobs/compress.py)."""
    n = len(ids)
    batch = pa.RecordBatch.from_pydict(
        {
            key: pa.array(ids, pa.string()),
            "encoded_at": at
            if isinstance(at, pa.Array)
            else pa.array([at] * n, pa.timestamp("us", tz="UTC")),
            **{c: pa.array([str(lineage[c])] * n, pa.string()) for c in ENCODER_LINEAGE},
            "content_hash": pa.array(lineage["content_hash"], pa.string()),
        }
    )
    out = pa.Table.from_batches([vector_rows(batch, key, z, dtype)])
    for col, value, type_ in (
        ("source_table", BEHAVIOR_TABLE, pa.string()),
        ("source_version", lineage["source_version"], pa.int64()),
        ("layer", lineage["layer"], pa.int64()),
        ("compressor_name", lineage["compressor_name"], pa.string()),
        ("compressor_version", lineage["compressor_version"], pa.string()),
        ("dtype", dtype, pa.string()),
    ):
        out = out.append_column(col, pa.array([value] * n, type_))
    return out


def gated_upsert(tables: DeltaTables, settings: Settings, name: str, key: str, rows: pa.Table) -> int:
    """The feature-table gate (validation/) first; a failure quarantines the rows and writes nothing."""
    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import feature_suite

    dim = len(rows.column("vector")[0]) if rows.num_rows else 0
    suite = feature_suite(name, key, dim, settings.marc.output_dtype, conf=settings.validation)
    gate(rows, suite, table=name, tables=tables, run_id=new_run_id(f"bahe-{name}"), conf=settings.validation)
    return tables.upsert(name, rows, [key], delete_missing=True)


def publish_users(
    tables: DeltaTables, settings: Settings, inputs: BaheInputs, vectors: np.ndarray, run_id: str
) -> pa.Table:
    """User vectors of the users in scope at the cut, with flags and lineage (returned, not yet written)."""
    seqs, users = inputs.seqs, inputs.users
    lineage = inputs.lineage | {
        "compressor_name": "bahe",
        "compressor_version": run_id,
        "content_hash": [sequence_hash(seqs, inputs.behavior_keys, int(u)) for u in users],
    }
    ids = [str(k) for k in inputs.a.user_keys[users]]
    rows = feature_rows("user_id", ids, vectors[users], inputs.cut, lineage, settings.marc.output_dtype)
    rows = rows.append_column("no_history", pa.array(seqs.no_history[users]))
    return rows.append_column("missing_behaviors", pa.array(seqs.missing_per_user[users]))


def behavior_rows(settings: Settings, inputs: BaheInputs) -> pa.Table:
    """PCA of the split-layer behaviour vectors to bahe.behavior_dim, for behavior_llm_fv."""
    from llmfeat.models.marc.baselines import pca

    x = inputs.seqs.vectors
    d = min(settings.bahe.behavior_dim, x.shape[1], max(1, len(x) - 1))
    z = pca(x, d)(x)
    lineage = inputs.lineage | {
        "compressor_name": "pca",
        "compressor_version": f"pca-{d}-v{inputs.lineage['source_version']}",
        "content_hash": [str(k) for k in inputs.behavior_keys],
    }
    keys = [str(k) for k in inputs.behavior_keys]
    at = inputs.behavior_encoded_at.cast(pa.timestamp("us", tz="UTC"))
    return feature_rows("behavior_id", keys, z, at, lineage, settings.marc.output_dtype)
