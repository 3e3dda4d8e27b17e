"""The two arms of the online A/B: which model serves a user, what it reads from the online store, how it
scores.

- `assign_arm`: challenger when unit_hash(salt:user_id) < serving.challenger_share, else champion. A pure
  function of the user and the config, so every worker of the service puts a user in the same arm.
- `ServingModels`: the model version behind each alias, pinned at load. Each arm holds the registered ranker,
  the online fields of the feature service its version records (`feast.feature_service` tag, resolved through
  Feast: nothing here names a view) and its scorer. A reload re-resolves both aliases; a failed one keeps the
  last good model of that arm and reports the error.
- `ModelPins`: with several workers, one file that says which version each arm serves. The service's parent
  process resolves the aliases once and writes it before the workers start, so they all load the same
  versions; a reload in one worker rewrites it and the others follow within `serving.pin_check_s`.
- `Scorer`: one batched call per request into the registered ranker's own code: `score_arrays` on the
  columns as arrays when the ranker has it and it agrees with `score` on a probe frame at load; else
  `score` on a DataFrame of the same columns.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmfeat.models.evaluation.ab_stats import unit_hash
from llmfeat.registry import ModelNotFound, ModelRef, resolve
from llmfeat.serving.features import ServiceFeatures

if TYPE_CHECKING:
    from feast import FeatureStore

    from llmfeat.config import ServingConf, Settings
    from llmfeat.models.ctr.pyfunc import CtrRanker

log = logging.getLogger(__name__)
ARMS = ("champion", "challenger")

# (alias, pinned version or None = whatever the alias points at now) -> (ref, ranker)
Loader = Callable[[str, str | None], tuple[ModelRef, "CtrRanker"]]


def assign_arm(user_id: str, cfg: ServingConf) -> str:
    return "challenger" if unit_hash(f"{cfg.salt}:{user_id}") < cfg.challenger_share else "champion"


def registry_loader(settings: Settings) -> Loader:
    from llmfeat.registry import tracking_uri

    uri = tracking_uri(settings)
    name = settings.ctr.registry_name

    def load(alias: str, version: str | None = None) -> tuple[ModelRef, CtrRanker]:
        import mlflow

        from llmfeat.models.ctr.pyfunc import load_ranker

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        ref = resolve(name, alias, uri) if version is None else pinned(name, alias, version, uri)
        return ref, load_ranker(ref.uri)

    return load


def pinned(name: str, alias: str, version: str, uri: str) -> ModelRef:
    """The registry's record of one version, served under `alias`."""
    import mlflow

    mv = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, version)
    service = mv.tags.get("feast.feature_service")
    if not service:
        raise ModelNotFound(f"{name} version {mv.version} has no feast.feature_service tag: re-register it")
    return ModelRef(name, alias, str(mv.version), str(mv.run_id), service, dict(mv.tags))


class Scorer:
    """Scoring columns (ids, the feature service's fields) of one request -> (B,) click probabilities."""

    def __init__(self, ranker: CtrRanker, probe: dict[str, Any] | None = None):
        self.ranker = ranker
        self.fast = callable(getattr(ranker, "score_arrays", None))
        if self.fast and probe is not None:
            try:
                same = np.allclose(ranker.score_arrays(probe), ranker.score(as_frame(probe)), atol=1e-5)
            except Exception as err:  # a ranker whose array path does not fit its encoder: use the frame
                log.warning("score_arrays failed on the probe (%s): scoring through DataFrames", err)
                same = False
            if not same:
                log.warning("score_arrays disagrees with score: scoring through DataFrames (slower)")
            self.fast = same

    def __call__(self, columns: dict[str, Any]) -> np.ndarray:
        if self.fast:
            return self.ranker.score_arrays(columns)
        return self.ranker.score(as_frame(columns))


def as_frame(columns: dict[str, Any]) -> pd.DataFrame:
    """Columns as arrays -> the scoring frame `CtrRanker.score` takes (NaN vector rows become None)."""
    out: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim == 2:
            missing = np.isnan(values[:, 0])
            out[name] = [None if m else row for row, m in zip(values, missing, strict=True)]
        else:
            out[name] = values
    return pd.DataFrame(out)


@dataclass
class ServedModel:
    ref: ModelRef
    ranker: CtrRanker
    features: ServiceFeatures
    score: Scorer
    loaded_at: float = field(default_factory=time.time)


class ModelPins:
    """{arm: version} in one small JSON file, written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        return dict(json.loads(self.path.read_text())) if self.path.exists() else {}

    def write(self, versions: dict[str, str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(versions))
        os.replace(tmp, self.path)

    def stamp(self) -> float:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0.0


class ServingModels:
    """The champion and challenger models (and any shadow arms) with their online features and scorers."""

    def __init__(
        self,
        aliases: dict[str, str],
        loader: Loader,
        store: FeatureStore,
        online_store: str,
        pins: ModelPins | None = None,
    ):
        """`online_store`: the setting feast.online_store (sqlite or redis) that `store` was built with."""
        self.aliases, self.loader, self.store, self.pins = aliases, loader, store, pins
        self.online_store = online_store
        self.models: dict[str, ServedModel] = {}
        self.reload_errors: dict[str, str] = {}
        self._features: dict[str, ServiceFeatures] = {}
        self._lock = threading.Lock()
        self._pin_stamp = 0.0

    def load(self) -> None:
        """At start: every arm must load (the pinned version when pins exist), else the error propagates."""
        versions = self.pins.read() if self.pins is not None else {}
        self._pin_stamp = self.pins.stamp() if self.pins is not None else 0.0
        for arm, alias in self.aliases.items():
            self.models[arm] = self._serve(*self.loader(alias, versions.get(arm)))

    def _serve(self, ref: ModelRef, ranker: CtrRanker) -> ServedModel:
        features = self._features.get(ref.feature_service)
        if features is None:
            features = ServiceFeatures(self.store, ref.feature_service, self.online_store)
            self._features[ref.feature_service] = features
        return ServedModel(ref, ranker, features, Scorer(ranker, probe_columns(features)))

    def reload(self) -> dict[str, Any]:
        """Re-resolve both aliases; with pins, the new versions become every worker's."""
        for arm, alias in self.aliases.items():
            self._load_arm(arm, alias, None)
        if self.pins is not None and not self.reload_errors:
            self.pins.write({arm: m.ref.version for arm, m in self.models.items()})
            self._pin_stamp = self.pins.stamp()
        return self.status()

    def follow_pins(self) -> bool:
        """Load the versions another worker pinned, if the pin file changed; True when something changed."""
        if self.pins is None or self.pins.stamp() == self._pin_stamp:
            return False
        self._pin_stamp = self.pins.stamp()
        changed = False
        for arm, version in self.pins.read().items():
            if arm in self.models and self.models[arm].ref.version != version:
                changed |= self._load_arm(arm, self.aliases[arm], version)
        return changed

    def _load_arm(self, arm: str, alias: str, version: str | None) -> bool:
        try:
            served = self._serve(*self.loader(alias, version))
        except Exception as err:  # any failure: keep serving what works
            self.reload_errors[arm] = f"{type(err).__name__}: {err}"
            log.error("reload of %s (@%s) failed, still serving the last good model: %s", arm, alias, err)
            return False
        with self._lock:
            self.models[arm] = served
        self.reload_errors.pop(arm, None)
        return True

    @property
    def shadows(self) -> list[str]:
        """Arms beyond champion and challenger: scored on every request, never shown."""
        return [arm for arm in self.aliases if arm not in ARMS]

    def get(self, arm: str) -> ServedModel:
        with self._lock:
            return self.models[arm]

    def status(self) -> dict[str, Any]:
        return {
            "models": {
                arm: {
                    "alias": m.ref.alias,
                    "version": m.ref.version,
                    "feature_service": m.ref.feature_service,
                }
                for arm, m in self.models.items()
            },
            "reload_errors": dict(self.reload_errors),
            "array_scoring": {arm: m.score.fast for arm, m in self.models.items()},
        }


def probe_columns(features: ServiceFeatures, n: int = 4) -> dict[str, Any]:
    """A few rows of every column the service serves, some of them null, to check a scorer against."""
    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {"user_id": ["probe-user"] * n, "item_id": [f"probe-{i}" for i in range(n)]}
    for f in features.fields:
        if f.dim:
            values = rng.normal(size=(n, f.dim)).astype(np.float32)
            values[-1] = np.nan
        elif f.text:
            values = np.array(["probe", None, "probe|other", None][:n] + [None] * (n - 4), dtype=object)
        else:
            values = rng.integers(0, 50, n).astype(np.float64)
            values[-1] = np.nan
        columns[f.name] = values
    return columns
