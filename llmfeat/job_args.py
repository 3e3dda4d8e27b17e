"""The command-line arguments of the jobs whose modules import torch, scipy or pandas at the top.

`llmfeat` builds every subcommand's parser before it parses, and the job modules' own `main` (spark-submit,
the MLflow project) builds the same one: defined here, with nothing heavier than argparse, the parsers cost
no import of the jobs (`llmfeat --help` in under a second instead of about six).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PROTOCOLS = ("daily", "fresh", "cold_items")  # ctr-ablation's freshness protocols


def llm_args(parser: argparse.ArgumentParser) -> Any:
    """--llm (default) / --no-llm: the LLM feature service or the id one; returns the group for more."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--llm", dest="llm", action="store_true", default=True, help="with LLM vectors (default)"
    )
    which.add_argument("--no-llm", dest="llm", action="store_false", help="ids and side features only")
    return which


def train_args(parser: argparse.ArgumentParser) -> None:
    """train-ctr: which feature service, --both, --alias."""
    which = llm_args(parser)
    which.add_argument("--both", action="store_true", help="without LLM -> champion, with -> challenger")
    parser.add_argument("--alias", default=None, help="registry alias to set on the new version")


def sweep_args(parser: argparse.ArgumentParser) -> None:
    """eval-compression: the layer sweep's seeds and layers, and where its results go."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", default="", help="comma list of layers for the sweep (default: all)")
    parser.add_argument("--marc-layers", default="", help="extra layers to train MARC on for the layer plot")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the table, plots and JSON go")


def ablation_args(parser: argparse.ArgumentParser) -> None:
    """ctr-ablation: family, protocols, the cold-item share, the layer curve, seeds, output."""
    parser.add_argument("--family", choices=("lightgbm", "dnn"), default="lightgbm")
    parser.add_argument(
        "--protocols", default=",".join(PROTOCOLS), help="comma list of daily, fresh, cold_items"
    )
    parser.add_argument(
        "--cold-items", type=float, default=0.2, help="share of items launched at the test period"
    )
    parser.add_argument(
        "--cold-folds", type=int, default=None, help="disjoint cold-item draws (default: as many as fit)"
    )
    parser.add_argument("--layers", default="8,15,22,30", help="tapped layers of the curve (comma list)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of every arm (predictions averaged)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where ctr_results.{json,md} go")
    parser.add_argument(
        "--representation",
        choices=("marc", "pca"),
        default="marc",
        help="how the LLM item states are compressed",
    )


def student_args(parser: argparse.ArgumentParser) -> None:
    """eval-student: the student's folder and the lake it encoded."""
    parser.add_argument(
        "--student", type=Path, required=True, help="student folder written by distil-student"
    )
    parser.add_argument(
        "--student-data", type=Path, required=True, help="data_dir where the student encoded items_repr"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
