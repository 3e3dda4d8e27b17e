"""Typed configuration: YAML profiles in conf/ loaded into frozen pydantic models.

Every section rejects unknown keys; the error names the key, the file it came from and the keys allowed there.
A profile is a partial document over the defaults below (the defaults are the embedded local set-up), and
`--set section.key=value` overrides any leaf after the file is read.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuConf(Section):
    """GPU scheduling passed through to Spark (spark.{executor,task}.resource.gpu.*)."""

    executor_amount: int = 0
    task_amount: float = 0.0
    discovery_script: str | None = None  # relative paths are taken from the repo root


class SparkConf(Section):
    master: str = "local[*]"
    app_name: str = "llmfeat"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    extra: dict[str, str] = {}  # any other spark.* setting, passed as is
    gpu: GpuConf = GpuConf()


class DeltaConf(Section):
    # delta-rs needs no JVM jars; delta-spark needs io.delta:delta-spark on the cluster's classpath.
    backend: Literal["delta-rs", "delta-spark"] = "delta-rs"


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


class FeastConf(Section):
    """Feast: feature_store.yaml is generated from this into repo_dir; feature_repo/ holds the declarations."""

    project: str = "llmfeat"
    repo_dir: str | None = None  # feature_store.yaml, registry and online.db; default <data_dir>/feast
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis: str = "127.0.0.1:6379"  # Feast connection string: "host:port[,password=...,ssl=true]"
    offline_store: Literal["file", "spark"] = "file"  # spark reads the feast_* tables from the metastore
    batch_engine: Literal["local", "spark"] = "local"  # spark needs offline_store: spark


class ValidationConf(Section):
    """great-expectations gates (validation/): bounds the suites use, where reports and rejected rows go."""

    docs_dir: str = "data_docs"  # Data Docs site, under data_dir unless absolute
    quarantine_table: str = "quarantine"  # Delta table under <data_dir>/delta for rows a gate rejected
    examples: int = 5  # example rows named per failed expectation in the error message
    earliest_timestamp: dt.datetime = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
    max_clock_skew_s: float = 300.0  # event times may lead the validating clock by this much
    rating_range: tuple[float, float] = (1.0, 5.0)
    label_rate: tuple[float, float] = (0.01, 0.99)  # a collapsed label (all 0 or all 1) stops publication
    norm_slack: float = 2.0  # repr norm bounds: reference quantiles widened by this factor
    drift_min_mean_cosine: float = 0.9
    drift_changed_below: float = 0.999  # a row whose cosine to its previous vector is below this changed
    drift_max_changed_share: float = 0.5


class Settings(Section):
    profile: str = "local"
    data_dir: str = "data/local"  # Delta tables live under <data_dir>/delta/<table>
    spark: SparkConf = SparkConf()
    delta: DeltaConf = DeltaConf()
    ingest: IngestConf = IngestConf()
    feast: FeastConf = FeastConf()
    validation: ValidationConf = ValidationConf()

    @property
    def delta_root(self) -> Path:
        return Path(self.data_dir) / "delta"


def profile_path(profile: str) -> Path:
    """A profile name (local, tiny, cluster) or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    path = CONF_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
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
    for item in overrides:
        keys, value = parse_override(item)
        _check_path(keys, source=f"--set {item}")
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {}) or {}
        node[keys[-1]] = value
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_explain(err, source=str(path))) from None
    # Relative data paths are taken from where the command runs, then fixed for Spark workers.
    return settings.model_copy(update={"data_dir": str(Path(settings.data_dir).resolve())})


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


def _check_path(keys: list[str], source: str) -> None:
    """Reject an override path before it is applied; keys under a dict field (spark.extra.*) are free."""
    model: type[BaseModel] = Settings
    for i, k in enumerate(keys):
        field = model.model_fields.get(k)
        if field is None:
            raise ConfigError(_unknown(keys[: i + 1], model, source))
        sub = _section_type(field.annotation)
        if sub is None:
            return
        model = sub


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
