"""Typed configuration: YAML profiles in conf/ loaded into frozen pydantic models.

Every section rejects unknown keys; the error names the key, the file it came from and the keys allowed there.
A profile is a partial document over the defaults below (the defaults are the embedded local set-up), and
`--set section.key=value` overrides any leaf after the file is read.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmfeat.errors import UserError
from llmfeat.paths import conf_dir

log = logging.getLogger("llmfeat.config")


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuConf(Section):
    """GPU scheduling passed through to Spark (spark.{executor,task}.resource.gpu.*)."""

    executor_amount: int = 0
    task_amount: float = 0.0
    discovery_script: str | None = None  # relative paths are taken from the profile folder


class SparkConf(Section):
    master: str = "local[*]"
    app_name: str = "llmfeat"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    extra: dict[str, str | int | float | bool] = {}  # any other spark.* setting, passed as text
    gpu: GpuConf = GpuConf()


# Time travel the docs promise: every table version of the last 7 days stays readable (Delta's own default).
MIN_RETENTION_HOURS = 168


class DeltaConf(Section):
    # delta-rs needs no JVM jars; delta-spark needs io.delta:delta-spark on Spark's classpath: the session
    # lists the jars the set-up resolved (python -m llmfeat.delta_jars) unless spark.jars(.packages) has them.
    backend: Literal["delta-rs", "delta-spark"] = "delta-rs"
    jars: str | None = None  # a folder of delta-spark jars; None = the set-up's folder inside the environment
    # `llmfeat maintain`: files older versions need are vacuumed after this many hours (never below 168)
    retention_hours: int = Field(default=MIN_RETENTION_HOURS, ge=MIN_RETENTION_HOURS)


class SampleConf(Section):
    """The jobs that hold their rows in one process (torch training, evaluations, replay) read a sample."""

    max_users: int = Field(default=50_000, ge=1)  # every user up to this many; else a fixed hash sample
    max_rows: int = Field(default=20_000_000, ge=1)  # a sampled read past this many rows stops


class SourceFiles(Section):
    """The user's own logs: file paths plus a mapping from llmfeat's column names to theirs."""

    interactions: str
    items: str
    users: str
    format: Literal["csv", "tsv", "parquet"] = "csv"
    columns: dict[str, str] = {}  # llmfeat name -> your column, e.g. {"user_id": "uid", "timestamp": "ts"}
    genre_sep: str = "|"


class IngestConf(Section):
    source: Literal["ml-100k", "files"] = "ml-100k"
    ml100k_dir: str | None = None  # default: the copy inside the installed recbole package
    files: SourceFiles | None = None
    label_threshold: float = 4.0  # click = rating >= threshold
    valid_frac: float = 0.1
    test_frac: float = 0.1
    max_text_chars: int = 2000  # item title/genres, user gender/occupation; 0 = no limit
    long_text: Literal["cut", "reject"] = "cut"  # cut: shortened and counted; reject: fail naming the ids


class FeastConf(Section):
    """Feast: feature_repo/ is the repository (feature_store.yaml and declarations); these keys adjust it."""

    project: str = "llmfeat"
    repo_dir: str | None = None  # where registry.db and online.db live; default <data_dir>/feast
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis: str = "127.0.0.1:6379"  # Feast connection string: "host:port[,password=...,ssl=true]"
    offline_store: Literal["file", "spark"] = "file"  # spark reads the feast_* tables from the metastore
    batch_engine: Literal["local", "spark"] = "local"  # spark needs offline_store: spark


class EncodeConf(Section):
    """LLM encode job: which model, which layers, how texts are pooled and batched (models/encoder.py)."""

    model: str = "smollm2"  # "smollm2" (packaged GGUF), a .gguf path, or a local Hugging Face model folder
    cache_dir: str = "~/.cache/llmfeat/models"  # a GGUF is converted once to safetensors here
    layers: list[int] = [8, 15, 22, 30]  # tapped in one pass; nothing above the deepest is computed
    pooling: Literal["mean", "last"] = "mean"
    normalize: Literal["none", "l2"] = "l2"  # per layer and vector; raw middle layers overflow float16
    max_length: int = 512  # tokens; longer texts keep their head and are counted as truncated
    token_budget: int = 16384  # tokens per forward batch, texts packed end to end into rows
    max_batch: int = 4096  # rows per forward batch
    pack_width: int = 256  # row width short texts are packed into; a longer text gets a row of its own
    compile: bool = False  # torch.compile the decoder blocks: ~2x on GPU, ~10 s once per worker
    device: Literal["auto", "cpu"] = "auto"  # auto: Spark's task GPU, else a visible GPU, else CPU
    partitions: int = 0  # encode tasks per chunk; 0 = Spark's default parallelism
    commit_rows: int = 20000  # texts per Delta commit: a failed run keeps every finished chunk
    user_max_behaviors: int = 50  # newest behaviours kept in a user's text (older ones are cut first)
    user_max_chars: int = 1200  # about 450 SmolLM2 tokens, under max_length; also cut from the oldest side
    history_cut: str = "valid"  # static user texts (entity users) hold behaviours strictly before this
    snapshot_every_days: int = 1  # user_snapshots: one snapshot per user and period with new behaviour


class MarcConf(Section):
    """MARC compressor training (models/marc/model.py) and the compress job (spark_jobs/compress.py)."""

    layer: int = 15  # source layer of <entity>_repr; recorded with the compressor and every vector
    out_dim: int = 64  # d
    hidden_dim: int = 256
    task_dim: int = 64
    dropout: float = 0.1
    keep_weight: float = 0.1  # weight of the HSIC(x, z) term (maximised)
    # weight of the HSIC(z, t) term (minimised); 0: an ablation showed no gain from it (docs/marc.md)
    indep_weight: float = 0.0
    kernel_scale: float = 1.0  # RBF width = kernel_scale * median pairwise distance
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 30
    patience: int = 4
    seed: int = 0
    # Point-in-time rows (each with its user's newest snapshot): MARC fits on the first fit_frac of the train
    # period and stops early on the next stop_frac; CTR models learn from its vectors only on later rows.
    fit_frac: float = 0.5
    stop_frac: float = 0.1
    max_fit_rows: int = 0  # 0 = every fit row; else a seeded random sample (the demo uses one)
    output_dtype: Literal["float16", "int8"] = "int8"  # user_features / item_features vector type
    experiment: str = "llmfeat-marc"
    registry_name: str = "llmfeat-marc"  # registered as <registry_name>-users and <registry_name>-items
    alias: str = "champion"  # the compressor version the compress job publishes


class LiteConf(Section):
    """Lite-LLM4Rec next-item model and its baselines (models/lite_llm4rec/, spark_jobs/train_lite.py)."""

    layer: int = 15  # tapped layer of items_repr the item vectors come from (encoded once)
    max_seq: int = 50  # newest items of a history fed to the sequence model
    dim: int = 64  # D of the recommendation transformer
    heads: int = 2
    blocks: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128  # training windows per step
    max_epochs: int = 60
    patience: int = 5  # epochs without a better valid NDCG@k
    valid_queries: int = 2000  # valid queries scored per epoch (a fixed random sample); 0 = all
    seeds: list[int] = [0, 1, 2]
    k: int = 10  # Recall@k / NDCG@k, full ranking over all items
    models: list[Literal["popularity", "sasrec", "lite"]] = ["popularity", "sasrec", "lite"]
    publish_k: int = 0  # > 0: write each user's top-k candidates of the lite model to Delta (Feast view)
    candidates_table: str = "user_candidates"
    experiment: str = "llmfeat-lite"


class SlmrecConf(Section):
    """SLMRec student encoder distilled from the teacher's tapped layer (models/slmrec/, distil_student.py).

    The student is the teacher's first `student_layers` blocks, distilled on un-normalised states at the block
    boundaries; distillation texts are the encode job's texts at its length (`encode.max_length`).
    """

    teacher: str = "smollm2"  # as encode.model: a packaged name, a .gguf or a Hugging Face folder
    layer: int = 15  # the teacher's tapped layer, which the student reproduces at its last layer
    student_layers: int = 8  # N: teacher blocks kept
    blocks: int = 4  # B: distillation points, evenly spaced in teacher and student
    l2_weight: float = 0.1  # loss per block: (1 - cos) + l2_weight * ||h_s - h_t||_2, on raw states
    pooling: Literal["last", "mean", "encode"] = "last"  # state per block boundary; encode = encode.pooling
    tuning: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-4
    batch_size: int = 16
    steps: int = 200
    max_length: int = 0  # tokens per distillation text; 0 = encode.max_length (what the encode job reads)
    texts_per_entity: int = 512  # sampled from items, users and behaviours each
    holdout: int = 128  # texts per entity kept out of training for the held-out cosine
    seed: int = 0
    output_dir: str = "students"  # under data_dir unless absolute; the student folder is written inside
    experiment: str = "llmfeat-slmrec"


class MlflowConf(Section):
    """Tracking and registry; the default is a SQLite store under <data_dir>/mlflow."""

    tracking_uri: str | None = (
        None  # e.g. http://mlflow.internal:5000; None = sqlite:///<data_dir>/mlflow/mlflow.db
    )


class ValidationConf(Section):
    """great-expectations gates (validation/): bounds the suites use, where reports and rejected rows go."""

    docs_dir: str = "data_docs"  # Data Docs site, under data_dir unless absolute
    quarantine_table: str = "quarantine"  # Delta table under <data_dir>/delta for rows a gate rejected
    examples: int = 5  # example rows named per failed expectation in the error message
    # failing row ids a gate brings to the driver per expectation; past it the batch is quarantined whole
    max_failing_ids: int = Field(default=10_000, ge=1)
    earliest_timestamp: dt.datetime = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
    max_clock_skew_s: float = 300.0  # event times may lead the validating clock by this much
    rating_range: tuple[float, float] = (1.0, 5.0)
    label_rate: tuple[float, float] = (0.01, 0.99)  # a collapsed label (all 0 or all 1) stops publication
    drift_min_mean_cosine: float = 0.9
    drift_changed_below: float = 0.999  # a row whose cosine to its previous vector is below this changed
    drift_max_changed_share: float = 0.5


class CtrConf(Section):
    """CTR rankers (models/ctr/model.py) trained from a Feast training set (spark_jobs/train_ctr.py)."""

    experiment: str = "llmfeat-ctr"
    registry_name: str = "llmfeat-ctr"  # one registered model; versions carry aliases champion / challenger
    kind: Literal["dnn", "deepfm", "lightgbm"] = "deepfm"  # the model family (tag model.family)
    llm_feature_service: str = "ctr_marc_v2"  # feature_repo/feature_services.py: id side + MARC vectors
    id_feature_service: str = "ctr_id_v2"  # the same id side without the LLM vectors
    emb_dim: int = 16  # E: width of every field embedding
    hidden: list[int] = [128, 64]
    dropout: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    max_epochs: int = 8
    patience: int = 3
    seed: int = 0
    stop_frac: float = 0.5  # latest share of the valid split held out for early stopping and valid metrics
    residual_width: int = 64  # the LLM residual branch's hidden width
    residual_lr: float = 1e-2  # chosen on the valid split (1e-3 and 3e-3 left the branch at zero there)
    residual_weight_decay: float = 1e-4  # the branch is regularised: uninformative vectors stay near zero
    # While the branch trains, each batch's user (item) ids go to index 0 with this probability, so that it
    # learns in the regime it is scored in (most test users are unseen): "valid_rate" = the share of valid
    # rows whose user (item) is not in the fit vocabulary, for users and items apart; a float: both.
    id_dropout: Literal["valid_rate"] | Annotated[float, Field(ge=0.0, le=1.0)] = "valid_rate"
    residual_folds: int = 3  # the branch is selected by valid LogLoss averaged over this many time folds
    n_boot: int = 1000  # user resamples for the intervals of the final metrics and comparisons
    # kind=lightgbm (models/ctr/tree.py): boosting early-stopped on the valid rows' log-loss
    tree_learning_rate: float = 0.05
    tree_leaves: int = 31
    tree_min_leaf: int = 100
    tree_feature_fraction: float = 0.8
    tree_l2: float = 1.0
    tree_rounds: int = 2000  # at most; early stopping usually ends far sooner
    tree_early_stop: int = 50  # rounds without a better valid log-loss
    tree_threads: int = 0  # 0: LightGBM's default (every core); serving scores with one thread per worker
    # stream: train-ctr trains over the training set's files in bounded Arrow batches (models/ctr/stream.py)
    # instead of one in-memory frame; rows held at once stay below stream_buffer_rows + stream_batch_rows,
    # however many rows the set has. The set: the Delta table stream_table names ("{service}" is replaced by
    # the feature service, e.g. "training_set_{service}", as the Spark training-set job writes it), every row
    # of it; with stream_table empty, the set this process builds (Feast's join over sample.*), written to
    # scratch Parquet files under data_dir, then streamed.
    stream: bool = False
    stream_table: str = ""
    stream_buffer_rows: int = Field(default=65_536, ge=2)  # rows shuffled together (a mini-batch draws here)
    stream_batch_rows: int = Field(default=8_192, ge=1)  # rows per Arrow batch read from a file
    # > 1: the DNN trains on this many processes on the executors (pyspark's TorchDistributor, one task each;
    # torch.distributed with gloo), each streaming its share of the files; the set's files must be readable
    # there (a shared data_dir, as on the cluster profile)
    stream_workers: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _stream_fits(self) -> CtrConf:
        if self.stream and self.stream_buffer_rows < self.batch_size:
            raise ValueError(
                f"ctr.stream_buffer_rows={self.stream_buffer_rows} is below "
                f"ctr.batch_size={self.batch_size}: the shuffle buffer must hold at least one mini-batch"
            )
        if self.stream_workers > 1 and (not self.stream or self.kind == "lightgbm"):
            raise ValueError(
                f"ctr.stream_workers={self.stream_workers} trains the DNN family over a stream: it needs "
                "ctr.stream=true and ctr.kind dnn or deepfm "
                f"(got ctr.stream={self.stream}, ctr.kind={self.kind})"
            )
        try:
            self.stream_table.format(service="s")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"ctr.stream_table={self.stream_table!r}: the only placeholder is {{service}}"
            ) from None
        return self


class StateConf(Section):
    """The fresh user state (models/ctr/state.py, spark_jobs/user_state.py): every event, in time order."""

    prior_weight: float = 10.0  # pseudo-events at the fit period's like rate in the smoothed like rate
    half_life_s: float = 0.0  # > 0: also recency-weighted means (each event's weight halves per half-life)
    item_version: int | None = None  # the item vectors' compressor version; None: the one at marc.alias
    # The online store remembers an applied event's id while its time is within this window before its
    # user's newest event: a re-sent event inside it is a duplicate, an older one is refused by its time.
    event_id_window_s: int = Field(default=86_400, ge=0)


class PromotionConf(Section):
    """When `llmfeat promote` may move champion to the challenger (offline comparison on the test split)."""

    min_auc_lift: float = 0.0  # lower end of the paired 95% interval of AUC(challenger) - AUC(champion)
    max_delong_p: float = 0.05  # the paired AUC test (users resampled) must be below this
    max_logloss_increase: float = 0.0  # upper end of the interval of LogLoss(challenger) - LogLoss(champion)


class ServingConf(Section):
    """Ranking service for the online A/B (serving/ranking_service.py)."""

    host: str = "127.0.0.1"
    port: int = 8077
    workers: int = 0  # processes on one socket; 0 = one per CPU core, at most 4
    keep_alive_s: float = 65.0  # an idle client connection stays open this long (callers pool connections)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    challenger_share: float = 0.5  # share of users (stable hash) routed to the challenger
    salt: str = "ab-1"  # a new salt reshuffles the users between arms
    max_candidates: int = 1000
    slots: int = 3  # the top-k of a ranking that is shown, logged as impressions and open to clicks
    max_inflight: int = 32  # per worker: beyond it a /rank gets 503 + Retry-After at once (overload)
    max_wait_ms: float = 100.0  # a /rank that waited longer than this for its worker gets 503 instead
    retry_after_s: int = 1
    pin_check_s: float = 1.0  # workers follow a reload in another worker within this
    log_dir: str = "impressions"  # under data_dir unless absolute
    flush_every: int = 1000  # log lines per batch (one write + fsync), or every flush_interval_s
    flush_interval_s: float = 2.0
    segment_mb: int = 64  # a log file is closed at this size or age, and on shutdown
    segment_s: float = 3600.0
    # POST /events: applied events per Delta append, or every events_flush_s. Each append is a commit whose
    # cost grows with the table's log (81 ms at 5,300 commits, 6 ms on a new table): one a minute per worker,
    # not one a second; the batch job reads the table nightly, and the online state has every event at once.
    events_flush_every: int = 20_000
    events_flush_s: float = 60.0
    events_root: str | None = None  # Delta root applied events are appended to; default <data_dir>/delta
    # ab: each user sees one arm (stable hash); interleave: every request shows a team draft of both arms
    experiment: Literal["ab", "interleave"] = "ab"
    shadow_aliases: list[str] = []  # also scored on every request, logged, never shown (the replay's rankers)


class AbtestConf(Section):
    """Replay of held-out traffic and the online A/B's analysis (serving/replay.py, spark_jobs/abtest.py)."""

    requests: int = 2000  # replayed requests (users of the test split, candidates from their held-out rows)
    candidates: int = 10  # items per request (the service shows and logs its top serving.slots)
    seed: int = 0
    bid_min: float = 0.5  # cost-per-click bid of an item: bid_min..bid_max by a stable hash of its id
    bid_max: float = 1.5
    srm_alpha: float = 0.001  # sample-ratio-mismatch alarm threshold (chi-square p-value)
    n_boot: int = 500
    days: int = 3  # `abtest run` replays the test period's first N days in event order
    workspace: str = "replays"  # under data_dir: each run's online store, registry copies and event log
    weakened_service: str = "ctr_content_v1"  # the sensitivity check's known loser reads only item content


class BaheBaselineConf(Section):
    """`llmfeat bahe evaluate`: the full-text baseline BAHE is compared with."""

    layer: int = 15  # the baseline encoder taps this layer only and stops there


class BaheConf(Section):
    """BAHE (models/bahe/): shallow LLM layers encode each behaviour once; trainable deep layers over a
    user's behaviour sequence give the user vector (spark_jobs/bahe.py trains and publishes it)."""

    layer: int = 10  # tapped layer: behaviours are encoded by blocks 1..layer only (about a third of 30)
    baseline: BaheBaselineConf = BaheBaselineConf()
    deep: Literal["llm", "small"] = "llm"  # llm: blocks split+1.. of the LLM; small: a fresh transformer
    deep_layers: int = 2  # trainable blocks over the behaviour sequence
    heads: int = 9  # attention heads of the small transformer (must divide the width)
    input_gain: float = 24.0  # behaviour vectors are unit-norm; scaled so each dimension has RMS about 1
    pooling: Literal["mean", "last"] = "mean"  # over the behaviours strictly before the row's time
    max_behaviors: int = 1024  # newest behaviours kept per user sequence
    position_budget: int = 8192  # behaviour positions per forward batch (users are packed by length)
    compress: bool = True  # MARC compressor on the pooled vector, so it fits the user feature table
    out_dim: int = 64
    compress_hidden: int = 256
    keep_weight: float = 0.1  # weight of -nHSIC(pooled, compressed), as in MARC
    emb_dim: int = 32  # width of the CTR head's item embedding and user projection
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    users_per_batch: int = 64
    max_epochs: int = 4
    patience: int = 1
    seed: int = 0
    history_cut: str = "valid"  # published user vectors use behaviours strictly before this (split or ISO)
    feature_table: str = "user_bahe_features"  # its own representation: Feast view user_bahe_fv
    behavior_dim: int = 64  # behaviour vectors published to behavior_features: PCA of the split layer
    demo_users: int = 20  # the demo encodes only these users' behaviours (shortest histories); 0 = all


class Settings(Section):
    profile: str = "local"
    data_dir: str = "data/local"  # Delta tables live under <data_dir>/delta/<table>
    spark: SparkConf = SparkConf()
    delta: DeltaConf = DeltaConf()
    sample: SampleConf = SampleConf()
    ingest: IngestConf = IngestConf()
    encode: EncodeConf = EncodeConf()
    feast: FeastConf = FeastConf()
    validation: ValidationConf = ValidationConf()
    marc: MarcConf = MarcConf()
    lite: LiteConf = LiteConf()
    slmrec: SlmrecConf = SlmrecConf()
    mlflow: MlflowConf = MlflowConf()
    bahe: BaheConf = BaheConf()
    ctr: CtrConf = CtrConf()
    promotion: PromotionConf = PromotionConf()
    state: StateConf = StateConf()
    serving: ServingConf = ServingConf()
    abtest: AbtestConf = AbtestConf()

    @property
    def delta_root(self) -> Path:
        return Path(self.data_dir) / "delta"


# Keys renamed for one name per concept: the old name still works for one release, with a warning that names
# the new key. old path -> new path.
RENAMED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("lite", "item_layer"): ("lite", "layer"),
    ("slmrec", "teacher_layer"): ("slmrec", "layer"),
    ("bahe", "split_layer"): ("bahe", "layer"),
    ("bahe", "baseline_layer"): ("bahe", "baseline", "layer"),
    ("ctr", "epochs"): ("ctr", "max_epochs"),
    ("mlflow", "experiment"): ("marc", "experiment"),
    ("mlflow", "registry_name"): ("marc", "registry_name"),
    ("mlflow", "alias"): ("marc", "alias"),
    ("gate",): ("promotion",),
}


def _renamed(keys: list[str], source: str) -> list[str]:
    """The current path for `keys` (warning once per use of an old name); other paths unchanged."""
    for old, new in RENAMED.items():
        if tuple(keys[: len(old)]) == old:
            log.warning(
                "%s: %s is deprecated and will be removed in the next release: use %s",
                source, ".".join(old), ".".join(new),
            )  # fmt: skip
            return [*new, *keys[len(old) :]]
    return keys


def _rename_old_keys(doc: dict[str, Any], source: str) -> None:
    """Move every old key of a profile document to its new place (a value under the new name wins)."""
    for old in RENAMED:
        node: Any = doc
        for k in old[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old[-1] not in node:
            continue
        value = node.pop(old[-1])
        new = _renamed(list(old), source)
        target = doc
        for k in new[:-1]:
            target = target.setdefault(k, {})
        target.setdefault(new[-1], value)


def profile_path(profile: str) -> Path:
    """A profile name (local, tiny, cluster) or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    try:
        folder = conf_dir()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    path = folder / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            f"unknown profile {profile!r} in {folder}; known profiles: {', '.join(known)} (or a YAML path)"
        )
    return path


def parse_override(item: str) -> tuple[list[str], Any]:
    """`spark.master=local[2]` -> (["spark", "master"], "local[2]"); values are parsed as YAML scalars."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_settings(profile: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    path = profile_path(profile)
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    doc.setdefault("profile", path.stem)
    _rename_old_keys(doc, str(path))
    for item in overrides:
        keys, value = parse_override(item)
        keys = _check_path(_renamed(keys, f"--set {item}"), source=f"--set {item}")
        node = doc
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_explain(err, source=str(path))) from None
    # Relative data paths are taken from where the command runs, then fixed for Spark workers.
    return settings.model_copy(update={"data_dir": str(Path(settings.data_dir).resolve())})


def with_changes(settings: Settings, changes: dict[str, Any]) -> Settings:
    """A copy of `settings` with dotted keys set ({"feast.repo_dir": "/tmp/x"}), validated again."""
    doc = settings.model_dump()
    for dotted, value in changes.items():
        keys = _check_path(dotted.split("."), source=dotted)
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    try:
        return Settings.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_explain(err, source="changed settings")) from None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section model inside an annotation such as `SourceFiles | None`, else None (a leaf or a dict)."""
    for a in getattr(annotation, "__args__", (annotation,)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _model_at(keys: list[str]) -> type[BaseModel] | None:
    """The section model that holds the last key in `keys`, or None if the path leaves the schema."""
    model: type[BaseModel] | None = Settings
    for k in keys[:-1]:
        field = model.model_fields.get(k) if model else None
        model = _section_type(field.annotation) if field else None
    return model


def _check_path(keys: list[str], source: str) -> list[str]:
    """Reject an override path before it is applied. Under a dict field (spark.extra) the rest of the
    path is one free key: `spark.extra.spark.executor.cores` -> ["spark", "extra", "spark.executor.cores"]."""
    model: type[BaseModel] = Settings
    for i, k in enumerate(keys):
        field = model.model_fields.get(k)
        if field is None:
            raise ConfigError(_unknown(keys[: i + 1], model, source))
        sub = _section_type(field.annotation)
        if sub is None:
            rest = keys[i + 1 :]
            return keys[: i + 1] + ([".".join(rest)] if rest else [])
        model = sub
    return keys


def _unknown(keys: list[str], model: type[BaseModel] | None, source: str) -> str:
    where = ".".join(keys)
    if model is None:
        return f"{source}: unknown key {where!r}"
    allowed = ", ".join(model.model_fields)
    parent = ".".join(keys[:-1]) or "the top level"
    return f"{source}: unknown key {where!r}; allowed keys under {parent}: {allowed}"


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        keys = [str(k) for k in e["loc"]]
        if e["type"] == "extra_forbidden":
            lines.append(_unknown(keys, _model_at(keys), source))
        else:
            lines.append(f"{source}: {'.'.join(keys)}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
