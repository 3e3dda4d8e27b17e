"""Train the MARC compressor on the representation tables and register it in MLflow under an alias.

    spark-submit spark_jobs/train_compressor.py --config conf/local.yaml [--set marc.layer=15 ...]
    llmfeat train-compressor [--profile local] [--set key=value ...]

Reads user_snapshots_repr / items_repr at `marc.layer` plus interactions, users and items. Rows are point in
time: each interaction with its user's newest snapshot at or before it (the snapshot's text holds only earlier
behaviour, never the row's own label), users without history included (their demographics-only snapshot). MARC
fits on the first `marc.fit_frac` of the train period and early-stops on the next `marc.stop_frac` (rows later
than those it fits); CTR models learn from its vectors only after that. Logs params, per-epoch curves, final
metrics and both compressors (with signature and input example) to MLflow; registers <registry_name>-users /
-items and points the alias (`marc.alias`, default champion) at the new versions. The task-adaptation module
is not shipped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmfeat.config import MarcConf, SampleConf, Settings
from llmfeat.models.ctr.data import CtrArrays, ctr_arrays
from llmfeat.reprs import (
    ENCODER_LINEAGE,
    ReprError,
    layer_lineage,
    layer_matrix,
    parse_snapshot_id,
    repr_table,
    snapshot_users,
)
from llmfeat.sample import Sample, SampleTooLarge, distinct_values, spark_user_sample

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.models.marc.train import MarcFit
    from llmfeat.registry import RegisteredCompressor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSummary:
    run_id: str
    valid_auc: float
    best_epoch: int
    registered: list[RegisteredCompressor]

    def __str__(self) -> str:
        lines = [
            f"MARC compressor: valid AUC {self.valid_auc:.4f} (best epoch {self.best_epoch}), "
            f"run {self.run_id}"
        ]
        for r in self.registered:
            lines.append(
                f"  {r.name} version {r.version} @{r.alias}: layer {r.layer}, {r.in_dim} -> {r.out_dim}, "
                f"encoder {r.encoder_id}"
            )
        return "\n".join(lines)


def marc_config(cfg: MarcConf, in_dim: int) -> Any:
    from llmfeat.models.marc.model import MarcConfig

    return MarcConfig(
        in_dim, cfg.out_dim, cfg.hidden_dim, cfg.task_dim, cfg.dropout, cfg.keep_weight, cfg.indep_weight,
        cfg.kernel_scale,
    )  # fmt: skip


def train_config(cfg: MarcConf) -> Any:
    from llmfeat.models.trainer import TrainConfig

    return TrainConfig(cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.seed)


def load_inputs(
    spark: SparkSession | None, settings: Settings
) -> tuple[CtrArrays, dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Point-in-time arrays (user side = snapshots), the layer's states per entity (S, D) / (I, D), and each
    table's lineage.

    Torch fits in this one process, so its rows are read into it: the interactions (with a session and
    `marc.max_fit_rows` set, a seeded sample whose fit period holds about twice that many rows; set it on a
    large lake), and only the layer `marc.layer` of the users and items those rows touch. Without a session
    (small lakes) delta-rs reads the tables, the layer filtered as it reads."""
    from llmfeat.delta_io import open_tables
    from llmfeat.models.ctr.data import point_in_time

    tables = open_tables(settings, spark)
    name = repr_table("user_snapshots")
    if not tables.exists(name):
        raise ReprError(f"{name} not found: run `llmfeat encode --entity user_snapshots` first")
    layer = settings.marc.layer
    versions = {t: tables.version(t) for t in (name, repr_table("items"))}
    source = (
        SparkSample(spark, tables, settings, versions)
        if spark is not None
        else RustSource(tables, settings.sample, versions)
    )
    for table_name in versions:
        if layer not in (present := source.layers(table_name)):
            raise ReprError(f"{table_name}: layer {layer} not present (layers in the table: {present})")
    interactions, users, items = source.entities()
    a = ctr_arrays(interactions, users, items)
    snapshots = source.layer(name, "snapshot_id", layer, users)
    keys = np.array(sorted(set(snapshots.column("snapshot_id").to_pylist())), dtype=object)
    parsed = [parse_snapshot_id(k) for k in keys]
    snapshot_users = np.array([u for u, _ in parsed], dtype=object)
    micros = np.array([int(t.timestamp() * 1_000_000) for _, t in parsed], dtype=np.int64)
    a = point_in_time(a, keys, snapshot_users, micros)
    states, lineage = {}, {}
    for entity, table_name, repr_entity, entity_keys in (
        ("users", name, "user_snapshots", keys),
        ("items", repr_table("items"), "items", a.item_keys),
    ):
        table = snapshots if table_name == name else source.layer(table_name, "item_id", layer, items)
        states[entity] = layer_matrix(table, repr_entity, layer, entity_keys, table_name)
        lineage[entity] = layer_lineage(table, table_name, layer) | {
            "entity": entity,
            "source_table": table_name,
            "in_dim": states[entity].shape[1],
            "out_dim": settings.marc.out_dim,
            "source_version": versions[table_name],
        }
    return a, states, lineage


REPR_COLUMNS = ("layer", "vector", *ENCODER_LINEAGE)


class RustSource:
    """Without a session: the sampled users' rows (llmfeat/sample.py), one layer of each representation."""

    def __init__(self, tables: Any, conf: SampleConf, versions: dict[str, int | None]):
        self.tables, self.versions = tables, versions
        self.sample = Sample(tables, conf, versions)

    def entities(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        inter, users, items = self.sample.ctr_tables()
        return inter, users.select(["user_id"]), items.select(["item_id"])

    def layers(self, name: str) -> list[int]:
        return sorted(distinct_values(self.tables, name, ["layer"], self.versions[name]).get("layer", []))

    def layer(self, name: str, key: str, layer: int, entities: pa.Table) -> pa.Table:
        """`layer`'s rows of the sample's users (snapshots) or items, read with that filter pushed down."""
        names = pa.schema(self._table(name).schema().to_arrow()).names
        columns = [key, *[c for c in REPR_COLUMNS if c in names]]
        if key != "snapshot_id":
            return self.sample.read(name, columns, layer=[layer], **{key: entities.column(key)})
        at = self.sample.read(name, columns, layer=[layer])
        users = snapshot_users(at.column(key))
        return at.filter(pc.is_in(users, value_set=entities.column("user_id").cast(pa.string())))

    def _table(self, name: str) -> Any:
        from deltalake import DeltaTable

        return DeltaTable(self.tables.path(name), version=self.versions[name])


class SparkSample:
    """With a session: the training sample is chosen and filtered on the executors; only it is collected."""

    def __init__(self, spark: SparkSession, tables: Any, settings: Settings, versions: dict[str, int | None]):
        self.spark, self.tables, self.versions = spark, tables, versions
        self.cfg, self.limits = settings.marc, settings.sample

    def entities(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        from pyspark.sql import functions as F

        inter = self.tables.read_spark("interactions")
        users = self.tables.read_spark("users").select("user_id")
        if users.count() > self.limits.max_users:  # the users every in-process job samples
            inter = inter.join(spark_user_sample(users, self.limits.max_users), "user_id", "left_semi")
        if self.cfg.max_fit_rows > 0:
            fit = inter.where(F.col("split") == "train").count() * self.cfg.fit_frac
            fraction = min(1.0, 2 * self.cfg.max_fit_rows / max(fit, 1.0))
            if fraction < 1.0:
                inter = inter.sample(fraction=fraction, seed=self.cfg.seed)
                log.info("MARC: a %.4f sample of the interactions (marc.max_fit_rows)", fraction)
        inter = inter.select("user_id", "item_id", "label", "event_timestamp", "split").cache()
        if (rows := inter.count()) > self.limits.max_rows:
            inter.unpersist()
            raise SampleTooLarge(
                f"MARC's sample has {rows:,} interactions, above sample.max_rows="
                f"{self.limits.max_rows:,}: set marc.max_fit_rows or lower sample.max_users"
            )
        users = inter.select("user_id").distinct().orderBy("user_id")
        items = inter.select("item_id").distinct().orderBy("item_id")
        out = inter.toArrow(), users.toArrow(), items.toArrow()  # the sample: at most sample.max_rows
        inter.unpersist()
        return out

    def layers(self, name: str) -> list[int]:
        frame = self.tables.read_spark(name, self.versions[name])
        return sorted(r["layer"] for r in frame.select("layer").distinct().collect())  # a few values

    def layer(self, name: str, key: str, layer: int, entities: pa.Table) -> pa.Table:
        from pyspark.sql import functions as F

        frame = self.tables.read_spark(name, self.versions[name])
        at = frame.where(F.col("layer") == layer)
        wanted = self.spark.createDataFrame(entities)  # the sample's users or items
        if key == "snapshot_id":
            at = at.withColumn("user_id", F.regexp_extract(key, r"^(.*)@[^@]*$", 1))
        at = at.join(wanted, wanted.columns[0], "left_semi")
        return at.select(key, *[c for c in REPR_COLUMNS if c in frame.columns]).toArrow()  # the sample's


def log_fit(
    fit: MarcFit, settings: Settings, lineage: dict[str, dict[str, Any]]
) -> list[RegisteredCompressor]:
    import mlflow

    from llmfeat.registry import log_and_register

    mlflow.log_params({f"marc.{k}": v for k, v in settings.marc.model_dump().items()})
    for entity, lin in lineage.items():
        mlflow.log_params({f"{entity}.{k}": v for k, v in lin.items()})
    h = fit.history
    for epoch, (loss, score) in enumerate(zip(h.train_loss, h.valid_score, strict=True)):
        mlflow.log_metrics({"train_loss": loss, "valid_auc": score}, step=epoch)
    for key, values in h.extra.items():  # per-batch curves, thinned to at most 200 points
        stride = max(1, len(values) // 200)
        for step in range(0, len(values), stride):
            mlflow.log_metric(f"batch_{key}", values[step], step=step)
    mlflow.log_metrics({"best_valid_auc": h.best_score, "best_epoch": h.best_epoch})
    return [log_and_register(fit.compressor(e), settings, e, lineage[e]) for e in ("users", "items")]


def run(spark: SparkSession | None, settings: Settings) -> TrainSummary:
    import mlflow
    import torch

    from llmfeat.models.marc.train import fit_marc, marc_periods
    from llmfeat.registry import use_tracking
    from llmfeat.validation.data_docs import link_inputs, locations

    torch.set_num_threads(min(2, torch.get_num_threads()))
    a, states, lineage = load_inputs(spark, settings)
    cfg = settings.marc
    periods = marc_periods(a.timestamp, a.split, cfg.fit_frac, cfg.stop_frac)
    fit_rows, stop_rows = np.flatnonzero(periods["marc_fit"]), np.flatnonzero(periods["marc_stop"])
    log.info(
        "MARC: layer %d, %d -> %d, point-in-time rows: fit %d, stop %d", cfg.layer, states["items"].shape[1],
        cfg.out_dim, len(fit_rows), len(stop_rows),
    )  # fmt: skip
    fit = fit_marc(
        a, states["users"], states["items"], marc_config(cfg, states["items"].shape[1]), train_config(cfg),
        max_fit_rows=cfg.max_fit_rows, fit_rows=fit_rows, stop_rows=stop_rows,
    )  # fmt: skip
    use_tracking(settings, settings.marc.experiment)
    with mlflow.start_run(run_name=f"marc-layer{cfg.layer}-d{cfg.out_dim}") as active:
        mlflow.set_tags({"kind": "marc-compressor", "marc_config": str(asdict(fit.model.cfg))})
        inputs = [
            repr_table("items"),
            repr_table("user_snapshots"),
            "interactions",
        ]  # gated when they were published
        link_inputs(mlflow.MlflowClient(), active.info.run_id, locations(settings)[0].parent, inputs)
        registered = log_fit(fit, settings, lineage)
    return TrainSummary(active.info.run_id, fit.history.best_score, fit.history.best_epoch, registered)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import job_main

    return job_main("train-compressor", argv, lambda spark, settings: print(run(spark, settings)))


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.train_compressor import main as package_main

    sys.exit(package_main())
