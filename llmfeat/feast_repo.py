"""The Feast repository: feature_repo/ holds feature_store.yaml and the declarations; `feast` runs in it.

    feature_repo/feature_store.yaml       the embedded default: registry and online store under ../data/local
    <data_dir>/feast/registry.db          Feast's registry
    <data_dir>/feast/online.db            the SQLite online store (embedded default)

`llmfeat` opens the same repository with the same file, adjusted to the profile: the registry and online store
under the profile's data_dir, Redis or SQLite, the file or Spark offline store, and $LLMFEAT_DATA_DIR set to
data_dir so that the declarations' data sources read that lake. Nothing is ever written into feature_repo/.
$LLMFEAT_FEATURE_REPO points `llmfeat` at another repository (`llmfeat features init DIR`, then edited).

MARC vectors are published per compressor version (`MarcView`): version N of the registered compressor writes
<side>_marc_v<N>_features (compress), published as feast_<side>_marc_v<N> and served by <side>_marc_v<N>_fv,
next to every older version still declared.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llmfeat.config import Settings
from llmfeat.errors import UserError
from llmfeat.paths import feature_repo_dir, package_data_dir
from llmfeat.reprs import MarcView, marc_views_in

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

# Feast imports repo files as top-level modules of their directory; so do we, in dependency order.
DATA_DIR_ENV = "LLMFEAT_DATA_DIR"
FILE_STORE = "llmfeat.feast_delta.DeltaFileOfflineStore"  # feast.offline_store file: Delta read by its log
DECLARATION_MODULES = ("entities", "data_sources", "feature_views", "feature_services", "candidate_views")


@functools.cache
def import_feast() -> None:
    """Import feast, once per process, with typeguard's `@typechecked` as the identity while its modules load.

    Feast decorates its classes with it, and for every method the decorator parses, transforms and compiles
    that method's whole module again: 4 of the 7 s `import feast` takes here, paid by every process that reads
    features (each command, Spark driver and serving worker). The decorator is put back at once, so other
    code's checks are kept; feast's public API is typed and this project's calls to it are checked by mypy."""
    import typeguard  # feast's own requirement

    checked = typeguard.typechecked
    typeguard.typechecked = _unchecked  # type: ignore[assignment]
    try:
        import feast.infra.online_stores.sqlite  # noqa: F401  (the package, and the store opened later)
    finally:
        typeguard.typechecked = checked


def _unchecked(target: Any = None, **_options: Any) -> Any:
    return _unchecked if target is None else target


class FeatureStoreError(UserError, RuntimeError):
    """A feature store that is not set up for the request: the message says which command fixes it."""


def store_dir(settings: Settings) -> Path:
    """Where the registry and the SQLite online store live: <data_dir>/feast, or feast.repo_dir."""
    return Path(settings.feast.repo_dir) if settings.feast.repo_dir else Path(settings.data_dir) / "feast"


def data_dir_for_repo(settings: Settings) -> str:
    """$LLMFEAT_DATA_DIR as the declarations read it: relative to feature_repo/ where it can be (so that the
    `feast` CLI on the default data dir and `llmfeat` register the same source paths)."""
    data = Path(settings.data_dir).resolve()
    try:
        return os.path.relpath(data, feature_repo_dir())
    except ValueError:  # another drive
        return str(data)


def store_config(settings: Settings) -> dict[str, Any]:
    """feature_repo/feature_store.yaml with this profile's registry, online and offline store."""
    from llmfeat.session import session_conf

    doc: dict[str, Any] = yaml.safe_load((feature_repo_dir() / "feature_store.yaml").read_text())
    feast, folder = settings.feast, store_dir(settings).resolve()
    doc["project"] = feast.project
    doc["registry"] = str(folder / "registry.db")
    doc["online_store"] = (
        {"type": "redis", "connection_string": feast.redis}
        if feast.online_store == "redis"
        else {"type": "sqlite", "path": str(folder / "online.db")}
    )
    spark_conf = {"spark.master": settings.spark.master, **session_conf(settings.spark, delta=settings.delta)}
    doc["offline_store"] = (
        {"type": "spark", "spark_conf": spark_conf}
        if feast.offline_store == "spark"
        else {"type": FILE_STORE}
    )
    if feast.batch_engine == "spark":
        if feast.offline_store != "spark":
            raise FeatureStoreError("feast.batch_engine spark needs feast.offline_store spark")
        doc["batch_engine"] = {
            "type": "spark.engine",
            "spark_conf": spark_conf,
            "partitions": settings.spark.shuffle_partitions,
        }
    return doc


def declarations() -> dict[str, Any]:
    """Every Feast object declared in the repository (feature_repo_dir()), by variable name (the modules are
    imported, not run)."""
    import_feast()
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    folder = feature_repo_dir()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    kinds = (Entity, DataSource, FeatureView, FeatureService)
    found: dict[str, Any] = {}
    loaded_from = (str(folder), os.environ.get(DATA_DIR_ENV))
    for name in DECLARATION_MODULES:
        module = sys.modules.get(name)
        # Imported again from this folder when the repository or the data dir changed (the sources' paths are
        # read at import time); by file location, so that another repository on sys.path cannot answer.
        if module is None or getattr(module, "_llmfeat_loaded_from", None) != loaded_from:
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            if spec is None or spec.loader is None:
                raise FeatureStoreError(f"{folder / name}.py is missing: the repository is incomplete")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # the later modules import the earlier ones by name
            spec.loader.exec_module(module)
            module._llmfeat_loaded_from = loaded_from  # type: ignore[attr-defined]
        found.update({k: v for k, v in vars(module).items() if isinstance(v, kinds)})
    return found


def repo_objects(settings: Settings) -> list[Any]:
    """The objects to apply; with the Spark offline store each view reads its SparkSource twin instead."""
    import_feast()
    from feast import FeatureView

    objects = list(declarations().values())
    if settings.feast.offline_store != "spark":
        return objects
    spark_sources = importlib.import_module("data_sources").SPARK_SOURCES
    out: list[Any] = []
    for obj in objects:
        source = obj.batch_source if isinstance(obj, FeatureView) else None
        if source is not None:
            obj = copy.copy(obj)
            obj.batch_source = spark_sources[source.name]
        out.append(obj)
    return out + list(spark_sources.values())


def feature_views() -> dict[str, FeatureView]:
    import_feast()
    from feast import FeatureView

    return {v.name: v for v in declarations().values() if isinstance(v, FeatureView)}


def service_marc_views(service: str) -> list[MarcView]:
    """The MARC views (one compressor version's) that a declared feature service names."""
    import_feast()
    from feast import FeatureService

    found = [s for s in declarations().values() if isinstance(s, FeatureService) and s.name == service]
    if not found:
        raise FeatureStoreError(f"feature service {service!r} is not declared in {feature_repo_dir()}")
    return marc_views_in(p.name for p in found[0].feature_view_projections)


def vector_dim(view: FeatureView) -> int:
    """The declared length of a view's Array(Float32) vector field."""
    lengths = [f.vector_length for f in view.schema if f.name.endswith("_vector")]
    if len(lengths) != 1 or lengths[0] <= 0:
        raise FeatureStoreError(f"{view.name}: expected one *_vector field with vector_length set")
    return lengths[0]


def init_repo(target: Path) -> Path:
    """Copy the Feast repository shipped with the package (declarations, feature_store*.yaml) to `target`,
    for a pip user without a checkout; its feature_store.yaml then points at ../data/local beside it."""
    import shutil

    source = package_data_dir("feature_repo")
    if target.exists() and any(target.iterdir()):
        raise FeatureStoreError(f"{target} exists and is not empty: choose a new folder")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix in (".py", ".yaml") and path.name != "__init__.py":
            shutil.copy(path, target / path.name)
    return target


def use_data_dir(settings: Settings) -> None:
    """Point the declarations' data sources at this profile's lake."""
    os.environ[DATA_DIR_ENV] = data_dir_for_repo(settings)


def feast_cli(settings: Settings, *args: str) -> tuple[list[str], dict[str, str]]:
    """The `feast` command line (and environment) for this profile: the repository in feature_repo/ with this
    profile's feature_store.yaml, written under store_dir (`feast -c feature_repo -f <it> ...`)."""
    yaml_path = store_dir(settings).resolve() / "feature_store.yaml"
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by llmfeat for this profile; the repository is feature_repo/.\n"
    text += yaml.safe_dump(store_config(settings), sort_keys=False)
    if not yaml_path.exists() or yaml_path.read_text() != text:
        yaml_path.write_text(text)
    beside = Path(sys.executable).with_name("feast")  # the venv's CLI, whatever PATH says
    feast = str(beside) if beside.exists() else "feast"
    env = {**os.environ, DATA_DIR_ENV: data_dir_for_repo(settings)}
    return [feast, "-c", str(feature_repo_dir()), "-f", str(yaml_path), *args], env


def open_store(settings: Settings) -> FeatureStore:
    """The repository in feature_repo/ under this profile (registry and online store in store_dir)."""
    import_feast()
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    use_data_dir(settings)
    store_dir(settings).mkdir(parents=True, exist_ok=True)
    config = RepoConfig(**store_config(settings))
    config.repo_path = feature_repo_dir()
    return FeatureStore(repo_path=str(feature_repo_dir()), config=config)


def apply_repo(settings: Settings) -> FeatureStore:
    """`feast apply` of the declarations under this profile's config. Re-applying unchanged objects leaves the
    registry as it is; the online tables are (re)created when missing (e.g. after online.db was deleted)."""
    store = open_store(settings)
    # Copies: Feast's apply infers entity columns into the views it is given, and the declarations are
    # shared by every later call in this process.
    store.apply([copy.deepcopy(o) for o in repo_objects(settings)])
    return store
