"""MLflow glue: where the tracking store is, logging a compressor as a model, registering it under an
alias, and loading it back by alias with the lineage it was trained on.

Registered names: <marc.registry_name>-users and <marc.registry_name>-items. Each model version carries
tags that the compress job checks before it applies the compressor: encoder_id, weights_hash, layer, pooling,
in_dim, out_dim, entity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmfeat.errors import UserError
from llmfeat.reprs import COMPRESSOR_LINEAGE

if TYPE_CHECKING:
    from torch import nn

    from llmfeat.config import Settings

PIP_REQUIREMENTS = ["torch==2.13.0", "numpy"]


# The environment as the process started with it (`mlflow run`, or the user's export): read once, because
# mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI itself, and a later job on another data dir must not
# inherit an earlier job's store.
ENV = {
    name: os.environ.get(name)
    for name in (
        "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
    )
}  # fmt: skip


@contextmanager
def set_aside_env() -> Iterator[None]:
    """The MLflow variables set aside (for this module and for child processes), restored on exit: for work
    on another store named in the settings, such as a replay's copy, inside `mlflow run`."""
    saved, names = dict(ENV), list(ENV)
    environ = {k: os.environ.pop(k) for k in names if k in os.environ}
    ENV.update(dict.fromkeys(names))
    try:
        yield
    finally:
        ENV.update(saved)
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(environ)


def tracking_uri(settings: Settings) -> str:
    """$MLFLOW_TRACKING_URI when the process started with it (as under `mlflow run`), else the configured
    URI, else a SQLite store under <data_dir>/mlflow (created on first use)."""
    if ENV["MLFLOW_TRACKING_URI"]:
        return str(ENV["MLFLOW_TRACKING_URI"])
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    return default_store(settings)


def registry_uri(settings: Settings) -> str:
    """$MLFLOW_REGISTRY_URI when set, else the tracking store."""
    return ENV["MLFLOW_REGISTRY_URI"] or tracking_uri(settings)


def default_store(settings: Settings, create: bool = True) -> str:
    root = Path(settings.data_dir) / "mlflow"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(settings: Settings) -> str | None:
    """Local artefacts next to a SQLite store (the default one, or a copy such as a replay's); any other
    store decides for itself."""
    uri = tracking_uri(settings)
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def use_tracking(settings: Settings, experiment: str) -> str:
    """Point the mlflow library at the store and `experiment` (each job names its own: marc.experiment,
    ctr.experiment, ...); returns the experiment id.

    The MLFLOW_* variables win over the config: under `mlflow run` (MLFLOW_RUN_ID) the experiment is the one
    that run lives in, so that `mlflow.start_run()` resumes it; MLFLOW_EXPERIMENT_ID or _NAME pick another
    experiment; else the configured one, created on first use.
    """
    import mlflow

    try:
        mlflow.set_tracking_uri(tracking_uri(settings))
        mlflow.set_registry_uri(registry_uri(settings))
        if ENV["MLFLOW_RUN_ID"]:
            exp_id = mlflow.MlflowClient().get_run(ENV["MLFLOW_RUN_ID"]).info.experiment_id
        elif ENV["MLFLOW_EXPERIMENT_ID"]:
            exp_id = str(ENV["MLFLOW_EXPERIMENT_ID"])
        else:
            name = ENV["MLFLOW_EXPERIMENT_NAME"] or experiment
            exp = mlflow.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else mlflow.create_experiment(name, artifact_location(settings))
        mlflow.set_experiment(experiment_id=exp_id)
    except mlflow.MlflowException as err:
        raise TrackingError(explain(err, tracking_uri(settings))) from None
    return str(exp_id)


def use_ctr_tracking(settings: Settings) -> str:
    """The configured tracking store with the CTR experiment (ctr.experiment); returns its id."""
    return use_tracking(settings, settings.ctr.experiment)


class TrackingError(UserError, RuntimeError):
    """The tracking store or registry refused a request (unreachable, old schema, unknown run)."""


def explain(err: BaseException, uri: str) -> str:
    """One line for an MlflowException: what MLflow said and what to do about it."""
    said = (getattr(err, "message", None) or str(err)).strip().splitlines()
    first = said[0] if said else type(err).__name__
    low = first.lower()
    if "out-of-date database schema" in low or "mlflow db upgrade" in low:
        todo = f"upgrade the store: mlflow db upgrade {uri}"
    elif any(w in low for w in ("connection", "max retries", "failed to", "timed out", "unreachable")):
        todo = "start the tracking server or point MLFLOW_TRACKING_URI (or mlflow.tracking_uri) at one"
    else:
        todo = "check MLFLOW_TRACKING_URI (or mlflow.tracking_uri) and the names in the command"
    return f"MLflow at {uri}: {first} ({todo})"


def registered_name(settings: Settings, entity: str) -> str:
    return f"{settings.marc.registry_name}-{entity}"


@dataclass(frozen=True)
class RegisteredCompressor:
    name: str
    version: str
    alias: str
    tags: dict[str, str]

    @property
    def layer(self) -> int:
        return int(self.tags["layer"])

    @property
    def encoder_id(self) -> str:
        return self.tags["encoder_id"]

    @property
    def out_dim(self) -> int:
        return int(self.tags["out_dim"])

    @property
    def in_dim(self) -> int:
        return int(self.tags["in_dim"])


def log_and_register(
    compressor: nn.Module, settings: Settings, entity: str, lineage: dict[str, Any]
) -> RegisteredCompressor:
    """Inside an active run: log the compressor (signature from an input example), register, set the alias."""
    import mlflow

    in_dim = int(lineage["in_dim"])
    compressor.eval()  # exported in eval mode, so the shipped program has no dropout
    example = np.zeros((2, in_dim), dtype=np.float32)
    name = registered_name(settings, entity)
    info = mlflow.pytorch.log_model(
        compressor,
        name=f"compressor-{entity}",
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=name,
    )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    tags = {k: str(lineage[k]) for k in COMPRESSOR_LINEAGE}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, settings.marc.alias, version)
    return RegisteredCompressor(name, version, settings.marc.alias, tags)


def resolve_alias(settings: Settings, entity: str, alias: str | None = None) -> RegisteredCompressor:
    """The model version behind <name>@<alias>, with its lineage tags; a clear error when there is none."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(settings), registry_uri=registry_uri(settings))
    name, alias = registered_name(settings, entity), alias or settings.marc.alias
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.MlflowException as err:
        raise LookupError(
            f"no compressor registered as {name}@{alias} in {tracking_uri(settings)}: "
            f"run `llmfeat train-compressor` first ({err.message.splitlines()[0]})"
        ) from None
    missing = [k for k in COMPRESSOR_LINEAGE if k not in mv.tags]
    if missing:
        raise LookupError(f"{name} version {mv.version} lacks lineage tags {missing}; re-register it")
    return RegisteredCompressor(name, str(mv.version), alias, {k: mv.tags[k] for k in COMPRESSOR_LINEAGE})


def model_uri(registered: RegisteredCompressor) -> str:
    """A pinned version, not the alias: an alias moved mid-job must not mix two compressors."""
    return f"models:/{registered.name}/{registered.version}"


class ModelNotFound(UserError, LookupError):
    """An alias or version that the registry does not have."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str
    version: str
    run_id: str
    feature_service: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """Pinned to the version: an alias moved meanwhile must not change what is compared or served."""
        return f"models:/{self.name}/{self.version}"

    def label(self) -> str:
        return f"{self.alias} v{self.version}"


def resolve(name: str, alias: str, tracking_uri: str | None = None) -> ModelRef:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.MlflowException as err:
        raise ModelNotFound(
            f"no model registered as {name}@{alias}: train one with `llmfeat train-ctr --alias {alias}` "
            f"({err.message.splitlines()[0]})"
        ) from None
    service = mv.tags.get("feast.feature_service")
    if not service:
        raise ModelNotFound(f"{name} version {mv.version} has no feast.feature_service tag: re-register it")
    return ModelRef(name, alias, str(mv.version), str(mv.run_id), service, dict(mv.tags))
