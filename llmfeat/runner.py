"""How a job starts: config flags, settings validated before Spark starts, one session, errors as one line.

`llmfeat <job>` and `spark-submit spark_jobs/<job>.py` both end in `run_with_session`, so a job behaves the
same whichever started it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmfeat.config import ConfigError, Settings, load_settings
from llmfeat.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("llmfeat")

# Besides UserError: no model under the alias (LookupError), a missing input file.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, LookupError, FileNotFoundError)


def config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "--profile",
        dest="config",
        default="local",
        help="profile (local, tiny, cluster; $LLMFEAT_CONF_DIR for your own) or a YAML path (default: local)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set spark.master=local[2] (repeatable)",
    )


def setup_logging() -> None:
    """INFO lines from llmfeat and the jobs; libraries that narrate their internals at INFO only warn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs every datasource it loads


def command_settings(command: str, config: str, overrides: list[str]) -> Settings | None:
    """Logging set up and settings loaded for one command; None (after printing why) on a config error."""
    setup_logging()
    try:
        return load_settings(config, overrides)
    except ConfigError as err:
        print(f"llmfeat {command}: config error: {err}", file=sys.stderr)
        return None


def run_with_session(
    name: str,
    config: str,
    overrides: list[str],
    body: Callable[[SparkSession, Settings], Any],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Exit 2 on a config error, 1 on bad input (`errors` adds job-specific classes), 0 when `body` ran."""
    settings = command_settings(name, config, overrides)
    if settings is None:
        return 2
    from llmfeat.session import build_session

    started = time.monotonic()
    try:
        spark = build_session(settings.spark)
        body(spark, settings)
    except (*USER_ERRORS, *errors) as err:
        print(f"llmfeat {name}: error: {err}", file=sys.stderr)
        return 1
    log.info("%s finished in %.1f s", name, time.monotonic() - started)
    return 0


def job_main(
    name: str,
    argv: list[str] | None,
    body: Callable[[SparkSession, Settings], Any],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse config flags, validate the config before Spark starts, run `body`, map bad input to exit 1."""
    parser = argparse.ArgumentParser(prog=f"llmfeat {name}")
    config_args(parser)
    args = parser.parse_args(argv)
    return run_with_session(name, args.config, args.overrides, body, errors)
