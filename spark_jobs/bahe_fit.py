"""BAHE's inputs and training: the behaviour table read back, each user's behaviour sequence, the fit.

Shared by the BAHE job (spark_jobs/bahe.py) and its evaluation (spark_jobs/bahe_eval.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import BaheConf, Settings
from llmfeat.models.bahe.data import BehaviorSequences, behavior_matrix, behavior_sequences
from llmfeat.models.ctr.data import CtrArrays, ctr_arrays
from llmfeat.reprs import layer_lineage, repr_table
from llmfeat.sample import Sample, scalar

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmfeat.delta_io import DeltaTables
    from llmfeat.models.bahe.model import Bahe, BaheConfig
    from llmfeat.models.bahe.train import BaheFit
    from llmfeat.spark_jobs.encode import EncodeSummary

log = logging.getLogger("llmfeat.bahe")
BEHAVIOR_TABLE = repr_table("behaviors")


@dataclass
class BaheInputs:
    a: CtrArrays  # rows of the users in scope
    seqs: BehaviorSequences
    behavior_keys: np.ndarray  # (V,)
    behavior_encoded_at: pa.Array  # (V,) when each behaviour vector was encoded
    lineage: dict[str, Any]  # encoder_id, weights_hash, pooling, layer, source_version
    cut: datetime
    users: np.ndarray  # (U',) indices of the users in scope


def behavior_settings(settings: Settings) -> Settings:
    """The encode settings for the behaviour table: only the shallow layers, up to the split."""
    encode = settings.encode.model_copy(update={"layers": [settings.bahe.split_layer]})
    return settings.model_copy(update={"encode": encode})


def cut_time(spark: SparkSession | None, tables: DeltaTables, cut: str) -> datetime:
    """bahe.history_cut as a time: the first event of a split ("valid") or an ISO time; Spark is optional."""
    from llmfeat.user_text import history_cut

    if spark is not None:
        return history_cut(tables.read_spark("interactions"), cut)
    if cut not in ("valid", "test"):
        return datetime.fromisoformat(cut)
    first = scalar(tables, "interactions", f"SELECT MIN(event_timestamp) FROM t WHERE split = '{cut}'")
    if first is None:
        raise ValueError(f"bahe.history_cut {cut!r}: the interactions table has no {cut!r} rows")
    return first  # type: ignore[no-any-return]


def sample_users(spark: SparkSession, tables: DeltaTables, conf: BaheConf, n: int) -> list[str]:
    """A documented quick sample: the n users with the fewest behaviours before the cut (at least one), ties
    by user id. Their histories are short, so few behaviours need encoding."""
    from pyspark.sql import functions as F

    cut = cut_time(spark, tables, conf.history_cut)
    ub = tables.read_spark("user_behaviors").where(F.col("event_timestamp") < F.lit(cut))
    fewest = ub.groupBy("user_id").count().orderBy("count", F.length("user_id"), "user_id").limit(n)
    return [r["user_id"] for r in fewest.collect()]  # n rows


def sample_behaviors(spark: SparkSession, tables: DeltaTables, conf: BaheConf, users: list[str]) -> DataFrame:
    """The behaviour ids of the sampled users' events before the cut (one column, behavior_id)."""
    from pyspark.sql import functions as F

    cut = cut_time(spark, tables, conf.history_cut)
    ub = tables.read_spark("user_behaviors")
    return ub.where(F.col("user_id").isin(users) & (F.col("event_timestamp") < F.lit(cut))).select(
        "behavior_id"
    )


def encode_behaviors(spark: SparkSession, settings: Settings, n_sample: int = 0) -> EncodeSummary:
    """behaviors_repr at the split layer; with n_sample > 0, only the behaviours of the sampled users."""

    from llmfeat.delta_io import open_tables
    from llmfeat.spark_jobs.encode import run

    only: DataFrame | None = None
    if n_sample:
        tables = open_tables(settings, spark)
        users = sample_users(spark, tables, settings.bahe, n_sample)
        only = sample_behaviors(spark, tables, settings.bahe, users)
    return run(spark, behavior_settings(settings), "behaviors", only=only)


def subset_rows(a: CtrArrays, keep: np.ndarray) -> CtrArrays:
    """The same users and items, only the rows where keep (N,) is true."""
    return CtrArrays(
        a.user_keys, a.item_keys, a.user_idx[keep], a.item_idx[keep], a.label[keep], a.split[keep],
        a.timestamp[keep], a.dense[keep], a.warm[keep],
    )  # fmt: skip


def load_inputs(spark: SparkSession | None, settings: Settings, n_sample: int = 0) -> BaheInputs:
    from llmfeat.delta_io import open_tables

    conf = settings.bahe
    tables = open_tables(settings, spark)
    if not tables.exists(BEHAVIOR_TABLE):
        raise FileNotFoundError(f"{BEHAVIOR_TABLE} not found under {tables.root}: run `llmfeat bahe encode`")
    version = tables.version(BEHAVIOR_TABLE)
    sample = Sample(tables, settings.sample, {BEHAVIOR_TABLE: version})  # llmfeat/sample.py
    a = ctr_arrays(*sample.ctr_tables())
    ub = sample.read("user_behaviors")
    seen = {} if sample.users is None else {"behavior_id": pc.unique(ub.column("behavior_id"))}
    table = sample.read(BEHAVIOR_TABLE, **seen)  # every layer: a missing one is named with those present
    keys, vectors = behavior_matrix(table, conf.split_layer)
    encoded_at = table.filter(pc.equal(table["layer"], conf.split_layer))["encoded_at"].combine_chunks()
    lineage = layer_lineage(table, BEHAVIOR_TABLE, conf.split_layer) | {"source_version": version}
    cut = cut_time(spark, tables, conf.history_cut)
    users = np.arange(len(a.user_keys))
    if n_sample:
        if spark is None:
            raise ValueError("a user sample needs Spark")
        chosen = set(sample_users(spark, tables, conf, n_sample))
        users = np.flatnonzero([k in chosen for k in a.user_keys])
        a = subset_rows(a, np.isin(a.user_idx, users))
        ub = ub.filter(pc.is_in(ub.column("user_id"), pa.array(sorted(chosen))))
    cut_us = int(cut.timestamp() * 1_000_000)
    seqs = behavior_sequences(ub, keys, vectors, a.user_keys, cut_us, conf.max_behaviors)
    return BaheInputs(a, seqs, keys, encoded_at, lineage, cut, users)


def bahe_config(conf: BaheConf, width: int, n_items: int) -> BaheConfig:
    from llmfeat.models.bahe.model import BaheConfig

    return BaheConfig(
        width, n_items, conf.deep, conf.deep_layers, conf.heads, conf.input_gain, conf.pooling,
        conf.max_behaviors, conf.compress, conf.out_dim, conf.compress_hidden, conf.keep_weight, conf.emb_dim,
        conf.dropout,
    )  # fmt: skip


def build_model(settings: Settings, width: int, n_items: int) -> Bahe:
    """deep=llm loads the configured LLM (its blocks above the split become the deep part)."""
    import torch

    from llmfeat.models.bahe.model import build_bahe

    conf = settings.bahe
    torch.manual_seed(conf.seed)
    base = None
    if conf.deep == "llm":
        from transformers import AutoModel

        from llmfeat.models.encoder import resolve_model

        source = resolve_model(settings.encode.model, settings.encode.cache_dir)
        base = AutoModel.from_pretrained(source.path, dtype=torch.float32)
    return build_bahe(bahe_config(conf, width, n_items), base, conf.split_layer)


def train(settings: Settings, inputs: BaheInputs) -> BaheFit:
    from llmfeat.models.bahe.train import BaheTrainConfig, fit_bahe

    c = settings.bahe
    model = build_model(settings, inputs.seqs.vectors.shape[1], len(inputs.a.item_keys))
    cfg = BaheTrainConfig(
        c.lr, c.weight_decay, c.users_per_batch, c.max_epochs, c.patience, c.seed, c.position_budget
    )
    return fit_bahe(model, inputs.seqs, inputs.a, cfg)
