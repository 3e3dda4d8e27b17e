"""`llmfeat` subcommands for the CTR models and their A/B tests (the CLI's main only dispatches here).

    llmfeat train-ctr [--llm|--no-llm|--both] [--alias NAME]   Feast training set -> MLflow run + registry
    llmfeat compare [--a champion] [--b challenger]            offline A/B on one held-out snapshot
    llmfeat promote [--champion champion] [--challenger challenger]
    llmfeat serve                                              ranking service (FastAPI on uvicorn)
    llmfeat abtest run [--days N] | analyze [--log DIR] | replay --url URL
None of them needs Spark: train-ctr, compare and `abtest analyze` call their jobs' `run(None, settings, ...)`
(spark_jobs/train_ctr.py, compare.py, abtest.py); Delta is read with delta-rs and features come from Feast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfeat.config import Settings

if TYPE_CHECKING:
    from llmfeat.spark_jobs.train_ctr import TrainedCtr

COMMANDS = ("training-set", "train-ctr", "compare", "promote", "serve", "abtest")


def add_parsers(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from llmfeat.job_args import llm_args, train_args

    training_set = sub.add_parser(
        "training-set", help="build, gate and describe the point-in-time training set"
    )
    llm_args(training_set)
    training_set.add_argument(
        "--spark",
        action="store_true",
        help="every interaction row, joined on the Spark executors, written to Delta as "
        "training_set_<service> (spark_jobs/training_set_spark.py)",
    )
    train = sub.add_parser("train-ctr", help="train a CTR ranker from Feast, track and register it in MLflow")
    train_args(train)
    compare = sub.add_parser("compare", help="offline A/B of two registry aliases on one held-out snapshot")
    compare.add_argument("--a", default="champion")
    compare.add_argument("--b", default="challenger")
    promote = sub.add_parser(
        "promote", help="move champion to the challenger if the comparison passes the promotion rule"
    )
    promote.add_argument("--champion", default="champion")
    promote.add_argument("--challenger", default="challenger")
    sub.add_parser(
        "serve", help="ranking service: champion/challenger split, Feast online features, event log"
    )
    abtest = sub.add_parser(
        "abtest", help="online experiments: replay the test period in event order, analyse an event log"
    )
    abtest.add_argument("action", choices=["replay", "analyze", "run"])
    abtest.add_argument(
        "--url", default=None, help="replay: the running service (default: serving.host:port)"
    )
    abtest.add_argument("--log", default=None, help="analyze: event-log folder (default: serving.log_dir)")
    abtest.add_argument(
        "--days", type=int, default=None, help="run: test days replayed (default abtest.days)"
    )
    for p in (training_set, train, compare, promote, sub.choices["serve"], abtest):
        config_args(p)


def dispatch(args: argparse.Namespace) -> int:
    from llmfeat.runner import USER_ERRORS, command_settings, mlflow_errors, one_line

    settings = command_settings(args.command, args.config, args.overrides)
    if settings is None:
        return 2
    bodies: dict[str, Callable[[Settings, argparse.Namespace], None]] = {
        "training-set": training_set_command,
        "train-ctr": train_command,
        "compare": lambda s, a: print(run_compare(s, a.a, a.b).report()),
        "promote": lambda s, a: print(run_promote(s, a.champion, a.challenger).report()),
        "serve": lambda s, a: _serve(s),
        "abtest": abtest_command,
    }
    try:
        bodies[args.command](settings, args)
    except (*USER_ERRORS, *mlflow_errors()) as err:
        print(f"llmfeat {args.command}: error: {one_line(err, settings)}", file=sys.stderr)
        return 1
    return 0


def train_models(settings: Settings, llm: bool, both: bool, alias: str | None) -> list[TrainedCtr]:
    from llmfeat.spark_jobs.train_ctr import run, worker_session

    return run(worker_session(settings), settings, llm, alias, both)


def training_set_command(settings: Settings, args: argparse.Namespace) -> None:
    if args.spark:
        from llmfeat.session import build_session
        from llmfeat.spark_jobs.training_set_spark import run as on_spark

        print(on_spark(build_session(settings.spark, settings.delta), settings, args.llm).report())
        return
    from llmfeat.spark_jobs.training_set import run

    print(run(None, settings, args.llm).report())


def train_command(settings: Settings, args: argparse.Namespace) -> None:
    for trained in train_models(settings, args.llm, args.both, args.alias):
        print(trained.summary())


def run_compare(settings: Settings, a: str, b: str) -> Any:
    from llmfeat.spark_jobs.compare import run

    return run(None, settings, a, b)


def run_promote(settings: Settings, champion: str, challenger: str) -> Any:
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store
    from llmfeat.spark_jobs.compare import promote

    store, tables = open_store(settings), open_tables(settings)
    return promote(settings, tables, store, champion, challenger)


def _serve(settings: Settings) -> None:
    from llmfeat.serving.server import serve

    serve(settings)


def abtest_command(settings: Settings, args: argparse.Namespace) -> None:
    if args.action == "replay":
        url = args.url or f"http://{settings.serving.host}:{settings.serving.port}"
        print(replay_against(settings, url))
    elif args.action == "analyze":
        print(analyze_log(settings, args.log))
    else:
        online_ab(settings, args.days)


def replay_against(settings: Settings, url: str) -> Any:
    from llmfeat.delta_io import RustDelta
    from llmfeat.serving.replay import held_out_requests, replay

    cfg = settings.abtest
    tables = RustDelta(settings.delta_root)
    requests = held_out_requests(tables, cfg.requests, cfg.candidates, cfg.seed, settings.sample)
    return replay(url, requests)


def analyze_log(settings: Settings, folder: Path | str | None) -> str:
    """The A/B analysis of the event log in `folder` (default: serving.log_dir), as printed."""
    from llmfeat.spark_jobs.abtest import format_result, run

    return format_result(settings, run(None, settings, folder))


def online_ab(settings: Settings, days: int | None = None) -> Any:
    """The time-ordered replay in its own workspace (spark_jobs/abtest_replay.py); prints and returns it."""
    from llmfeat.spark_jobs.abtest_replay import run

    result = run(None, settings, days)
    print(result.report())
    return result
