"""`llmfeat` subcommands for the next-item model and the distilled student encoder (cli.py only dispatches).

    llmfeat train-lite [--set lite.publish_k=50]      popularity, SASRec, Lite-LLM4Rec -> MLflow
    llmfeat distil-student [--set slmrec.steps=200]   SLMRec student folder for `encode.model`, run in MLflow
    llmfeat eval-student --student FOLDER --student-data DIR   probe AUC and throughput vs the teacher

None of them needs Spark: Delta is read with delta-rs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS = ("train-lite", "distil-student", "eval-student")


def add_parsers(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    lite = sub.add_parser("train-lite", help="next-item models on the time split (Lite-LLM4Rec + baselines)")
    distil = sub.add_parser("distil-student", help="SLMRec: distil a layer-pruned student encoder")
    ev = sub.add_parser("eval-student", help="student vs teacher: feature AUC and encode throughput")
    ev.add_argument("--student", type=Path, required=True, help="student folder written by distil-student")
    ev.add_argument(
        "--student-data", type=Path, required=True, help="data_dir where the student encoded items_repr"
    )
    ev.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    for p in (lite, distil, ev):
        config_args(p)


def dispatch(args: argparse.Namespace) -> int:
    from llmfeat.models.encoder import EncoderError
    from llmfeat.runner import USER_ERRORS, command_settings, mlflow_errors, one_line

    settings = command_settings(args.command, args.config, args.overrides)
    if settings is None:
        return 2
    caught: tuple[type[BaseException], ...] = (*USER_ERRORS, EncoderError, ValueError)
    try:
        if args.command == "train-lite":
            from llmfeat.spark_jobs.train_lite import main as train_lite

            train_lite(settings)
        elif args.command == "distil-student":
            from llmfeat.spark_jobs.distil_student import main as distil

            distil(settings)
        else:
            from llmfeat.spark_jobs.eval_student import main as evaluate

            evaluate(settings, args.student, args.student_data, args.out)
    except (*caught, *mlflow_errors()) as err:
        print(f"llmfeat {args.command}: error: {one_line(err, settings)}", file=sys.stderr)
        return 1
    return 0
