"""How a job starts: config flags, settings validated before Spark starts, one session, errors as one line.

`llmfeat <job>` and `spark-submit spark_jobs/<job>.py` both end in `run_with_session`, so a job behaves the
same whichever started it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmfeat.config import ConfigError, Settings, load_settings
from llmfeat.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("llmfeat")

# The one list of errors a command reports as one line instead of a traceback: every UserError (bad config,
# model path or layers, feature store, registry alias, input table, a failed gate, ...), plus the library
# errors that mean the same: no model under the alias (LookupError), a missing input file.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, LookupError, FileNotFoundError)
# Libraries that narrate their internals at INFO (Feast: "Registry cache expired, so refreshing" on every
# read): WARNING and above unless -v.
CHATTY = ("feast", "great_expectations", "mlflow", "alembic", "py4j", "urllib3", "httpx", "matplotlib")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_verbose = False


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
    verbose_arg(parser)


def verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action=_Verbose, help="also show the libraries' INFO lines (Feast, MLflow, ...)"
    )


class _Verbose(argparse.Action):
    """-v: every later setup_logging() keeps the libraries' INFO lines."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setup_logging(verbose=True)


def setup_logging(verbose: bool | None = None) -> None:
    """INFO lines from llmfeat and the jobs; third-party INFO chatter only with `verbose` (-v). None keeps
    the choice an earlier call made."""
    global _verbose
    if verbose is not None:
        _verbose = verbose
    logging.basicConfig(level=logging.INFO if _verbose else logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("llmfeat").setLevel(logging.INFO)
    level = logging.INFO if _verbose else logging.WARNING
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("py.warnings").setLevel(logging.WARNING)
    if not _verbose:  # mlflow sets its logger's level when imported; variables a user set win
        quiet_warnings()
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny download
    plain_output()


def plain_output() -> None:
    """No colour codes where stdout or stderr is not a terminal. Feast prints its materialization progress
    with colorama's escape codes ("Materializing 4 feature views ..." in green) whatever the stream is;
    colorama's own wrapper strips them from a stream that is not a TTY and leaves a terminal as it is. The
    wrapper goes on once per process."""
    from colorama import init
    from colorama.ansitowin32 import StreamWrapper

    streams = [s for s in (sys.stdout, sys.stderr) if s is not None]
    if any(isinstance(s, StreamWrapper) for s in streams) or all(_is_terminal(s) for s in streams):
        return
    init()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_warnings() -> None:
    """Python warnings go through logging ("py.warnings"), shown only with -v: libraries' notices about their
    own dependencies (SQLAlchemy under MLflow's store) are not for the person running a job. A filter would
    not do: libraries imported later put their own DeprecationWarning filters in front of it."""
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def one_line(err: BaseException, settings: Settings) -> str:
    """An error as the one line a person reads: MLflow's with the store and what to do."""
    if isinstance(err, mlflow_errors()):
        from llmfeat.registry import explain, tracking_uri

        return explain(err, tracking_uri(settings))
    return str(err)


def mlflow_errors() -> tuple[type[BaseException], ...]:
    """MlflowException once mlflow is imported (nothing raises it before), without importing mlflow."""
    module = sys.modules.get("mlflow.exceptions")
    return (module.MlflowException,) if module else ()


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
    before_session: Callable[[Settings], Any] | None = None,
) -> int:
    """Exit 2 on a config error, 1 on bad input (`errors` adds job-specific classes), 0 when `body` ran.
    `before_session` checks what needs no Spark, so that such an error comes before the JVM starts."""
    settings = command_settings(name, config, overrides)
    if settings is None:
        return 2
    from llmfeat.session import build_session

    def with_session(settings: Settings) -> Any:
        if before_session is not None:
            before_session(settings)
        spark = build_session(settings.spark, settings.delta)
        log_session(name, spark)
        return body(spark, settings)

    return _run(name, settings, with_session, errors)


def run_in_process(name: str, config: str, overrides: list[str], body: Callable[[Settings], Any]) -> int:
    """`run_with_session` for the jobs that need no Spark (torch training and evaluations on a bounded
    sample): the same settings, one-line errors and exit codes, and no session started."""
    settings = command_settings(name, config, overrides)
    return 2 if settings is None else _run(name, settings, body)


def _run(
    name: str,
    settings: Settings,
    body: Callable[[Settings], Any],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    started = time.monotonic()
    try:
        body(settings)
    except (*USER_ERRORS, *errors, *mlflow_errors()) as err:
        print(f"llmfeat {name}: error: {one_line(err, settings)}", file=sys.stderr)
        return 1
    log.info("%s finished in %.1f s", name, time.monotonic() - started)
    return 0


def log_session(name: str, spark: SparkSession) -> None:
    """Where the job runs: master, deploy mode and application id (spark-submit's, or the config's)."""
    sc = spark.sparkContext
    mode = sc.getConf().get("spark.submit.deployMode", "client")
    log.info("%s: Spark master %s (%s mode), application %s", name, sc.master, mode, sc.applicationId)


def job_main(
    name: str,
    argv: list[str] | None,
    body: Callable[[SparkSession, Settings], Any],
    errors: tuple[type[BaseException], ...] = (),
    before_session: Callable[[Settings], Any] | None = None,
) -> int:
    """Parse config flags, validate the config before Spark starts, run `body`, map bad input to exit 1."""
    parser = argparse.ArgumentParser(prog=f"llmfeat {name}")
    config_args(parser)
    args = parser.parse_args(argv)
    return run_with_session(name, args.config, args.overrides, body, errors, before_session)
