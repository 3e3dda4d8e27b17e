"""Where the files shipped with llmfeat are: profiles (conf/) and the Feast repository (feature_repo/).

Both travel as package data (`llmfeat.conf`, `llmfeat.feature_repo`): inside site-packages after a wheel
install, mapped onto the checkout's conf/ and feature_repo/ by an editable install. They are found through the
import system, never by guessing where a repository root is; LLMFEAT_CONF_DIR points at another profile
folder, LLMFEAT_FEATURE_REPO at another Feast repository (one written by `llmfeat features init DIR` and
edited, e.g. to declare the views of a new compressor version).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def package_data_dir(name: str) -> Path:
    """The folder of the data package `llmfeat.<name>` (conf or feature_repo)."""
    spec = importlib.util.find_spec(f"llmfeat.{name}")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            f"llmfeat.{name} is not installed with the package: reinstall llmfeat (pip install llmfeat, or "
            "`pip install -e .` in a checkout)"
        )
    return Path(locations[0])


def conf_dir() -> Path:
    """The profile folder: $LLMFEAT_CONF_DIR, else the profiles shipped with the package."""
    env = os.environ.get("LLMFEAT_CONF_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"LLMFEAT_CONF_DIR={env} is not a folder")
        return path
    return package_data_dir("conf")


def feature_repo_dir() -> Path:
    """The Feast repository (declarations and feature_store.yaml): $LLMFEAT_FEATURE_REPO, else the one
    shipped with the package."""
    env = os.environ.get("LLMFEAT_FEATURE_REPO")
    if env:
        path = Path(env)
        if not (path / "feature_store.yaml").is_file():
            raise FileNotFoundError(
                f"LLMFEAT_FEATURE_REPO={env} has no feature_store.yaml: see `llmfeat features init DIR`"
            )
        return path.resolve()
    return package_data_dir("feature_repo")
