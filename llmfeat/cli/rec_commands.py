"""`llmfeat` subcommands for the next-item model and the distilled student encoder (cli.py only dispatches).

    llmfeat train-lite [--set lite.publish_k=50]      popularity, SASRec, Lite-LLM4Rec -> MLflow
    llmfeat distil-student [--set slmrec.steps=200]   SLMRec student folder for `encode.model`, run in MLflow
    llmfeat eval-student --student FOLDER --student-data DIR   probe AUC and throughput vs the teacher

None of them needs Spark: Delta is read with delta-rs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

COMMANDS = ("train-lite", "distil-student", "eval-student")


def add_parsers(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from llmfeat.job_args import student_args

    lite = sub.add_parser("train-lite", help="next-item models on the time split (Lite-LLM4Rec + baselines)")
    distil = sub.add_parser("distil-student", help="SLMRec: distil a layer-pruned student encoder")
    ev = sub.add_parser("eval-student", help="student vs teacher: feature AUC and encode throughput")
    student_args(ev)
    for p in (lite, distil, ev):
        config_args(p)


def dispatch(args: argparse.Namespace) -> int:
    from llmfeat.runner import run_in_process
    from llmfeat.spark_jobs import distil_student, eval_student, train_lite

    def body(settings: Any) -> None:
        if args.command == "train-lite":
            print(train_lite.run(None, settings), flush=True)
        elif args.command == "distil-student":
            print(distil_student.run(None, settings), flush=True)
        else:
            eval_student.run(None, settings, args.student, args.student_data, args.out)

    return run_in_process(args.command, args.config, args.overrides, body)
