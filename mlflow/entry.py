"""Shared by the entry-point scripts: make the project importable and follow `mlflow run`'s tracking store.

The repository root is appended (not prepended) to sys.path, so `import mlflow` stays the installed library
even though this folder is called mlflow/ (it is deliberately not a package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_argv(argv: list[str]) -> list[str]:
    """Make the project importable; when `mlflow run` set a tracking URI, log there (the run it opened)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    os.chdir(ROOT)  # relative data_dir values are taken from the repository root
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return [*argv, "--set", f"mlflow.tracking_uri={uri}"] if uri else argv
