"""Shared by the entry-point scripts: make the project importable from a checkout.

`mlflow run` passes its tracking store and run as MLFLOW_TRACKING_URI and MLFLOW_RUN_ID; llmfeat/registry.py
follows both (they win over the config), so the job logs into the run `mlflow run` opened.

The repository root is appended (not prepended) to sys.path, so `import mlflow` stays the installed library
even though this folder is called mlflow/ (it is deliberately not a package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_argv(argv: list[str]) -> list[str]:
    """Make the project importable; relative data_dir values are taken from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    os.chdir(ROOT)
    return argv
