"""`llmfeat` command line. Each job command runs the same `run(spark, settings)` that spark-submit runs.

llmfeat ingest [--config local|PATH] [--set key=value ...]
llmfeat encode [--entity items,users,behaviors|all]  # LLM layer states -> <entity>_repr
llmfeat train-compressor               # MARC on <entity>_repr -> MLflow registry, alias champion
llmfeat compress [--entity users,items]  # registered compressor version N -> user_marc_v<N>_features, ...
llmfeat eval-compression               # layer sweep and compression baselines -> docs/marc_*.{md,png}
llmfeat tables                         # what is published, where, at which version
llmfeat maintain [--table NAME ...]    # compact (OPTIMIZE) and vacuum the Delta tables, keeping 7+ days
llmfeat features [apply|init DIR]      # Feast: publish, apply, materialize-incremental; or register only
llmfeat refresh                        # the daily refresh: encode, compress, materialize the new day
llmfeat user-state                     # each user's fresh state over the item vectors, per event time
llmfeat push EVENTS.jsonl              # events through the online event path (as POST /events), logged
llmfeat bahe encode|train|evaluate     # BAHE: behaviour table, hierarchical user encoder, comparison
llmfeat train-ctr | compare | promote  # CTR models in MLflow: train, offline A/B, gated promotion
llmfeat ctr-ablation                   # what LLM features add, by freshness protocol, family, slice, layer
llmfeat serve | abtest replay|analyze|run  # ranking service and the online A/B
llmfeat demo                           # the end-to-end job on the embedded defaults
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfeat.config import ConfigError, Settings, load_settings
from llmfeat.runner import config_args, run_in_process, run_with_session, verbose_arg

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("llmfeat")


def run_job(
    name: str, config: str, overrides: list[str], body: Callable[[SparkSession, Settings], Any]
) -> int:
    return run_with_session(name, config, overrides, body)


def environment() -> str:
    """Where each engine comes from: useful when a cluster's Python differs from the driver's."""
    import importlib

    from llmfeat.session import java_major_version

    lines = [
        f"{'python':<19}{sys.version.split()[0]:<12}{sys.executable}",
        f"{'java':<19}{java_major_version()}",
    ]
    for name in ("pyspark", "deltalake", "mlflow", "feast", "great_expectations", "torch", "transformers"):
        try:
            mod = importlib.import_module(name)
            lines.append(f"{name:<19}{getattr(mod, '__version__', '?'):<12}{mod.__file__}")
        except ImportError as err:
            lines.append(f"{name:<19}{'missing':<12}({err})")
    return "\n".join(lines)


def encode_command(args: argparse.Namespace) -> int:
    from llmfeat.spark_jobs.encode import parse_entities, run_all

    try:
        entities = parse_entities(args.entity)
    except argparse.ArgumentTypeError as err:
        print(f"llmfeat encode: {err}", file=sys.stderr)
        return 2
    return run_job("encode", args.config, args.overrides, lambda s, c: run_all(s, c, entities))


def features_command(args: argparse.Namespace) -> int:
    """`features` publishes, applies and materializes incrementally (`feast apply && feast
    materialize-incremental` on feature_repo/); `apply` only registers; `init DIR` writes the repository."""
    from llmfeat.feast_repo import FeatureStoreError, apply_repo, init_repo, store_dir
    from llmfeat.spark_jobs.materialize import format_published, run

    if args.action == "init":
        target = init_repo(Path(args.dir or "feature_repo"))
        print(f"Feast repository written to {target}: cd {target} && feast apply (see feature_store.yaml)")
        return 0
    if args.action in ("materialize", None):
        body = lambda s, c: print(format_published(run(s, c, full=args.full)))  # noqa: E731
        return run_job("features materialize", args.config, args.overrides, body)
    try:
        settings = load_settings(args.config, args.overrides)
        store = apply_repo(settings)
    except (ConfigError, FeatureStoreError) as err:
        print(f"llmfeat features apply: error: {err}", file=sys.stderr)
        return 2
    views = ", ".join(sorted(v.name for v in store.list_feature_views()))
    print(f"applied feature repo feature_repo/ (registry and online store in {store_dir(settings)}): {views}")
    return 0


def maintain_command(args: argparse.Namespace) -> int:
    """Compact and vacuum the Delta tables with the configured backend; versions of the last
    delta.retention_hours (at least 7 days) stay readable."""

    def body(spark: SparkSession, settings: Settings) -> None:
        from llmfeat.delta_io import maintain_tables, open_tables

        tables = open_tables(settings, spark)
        for done in maintain_tables(tables, settings.delta.retention_hours, args.table or None):
            print(done, flush=True)

    return run_job("maintain", args.config, args.overrides, body)


def marc_command(args: argparse.Namespace) -> int:
    """train-compressor, compress and eval-compression."""
    if args.command == "train-compressor":
        from llmfeat.spark_jobs.train_compressor import run as train

        return run_job(args.command, args.config, args.overrides, lambda s, c: print(train(s, c)))
    if args.command == "compress":
        from llmfeat.spark_jobs.compress import run as compress

        def body(spark: SparkSession, settings: Settings) -> None:
            for summary in compress(spark, settings, args.entity):
                print(summary)

        return run_job(args.command, args.config, args.overrides, body)
    from llmfeat.spark_jobs.eval_compression import run as evaluate
    from llmfeat.spark_jobs.eval_compression import sweep_config

    cfg = sweep_config(args.seeds, args.layers, args.marc_layers)
    return run_in_process(
        args.command, args.config, args.overrides, lambda s: evaluate(None, s, cfg, args.out)
    )


def marc_parsers(sub: Any) -> None:
    from llmfeat.job_args import sweep_args
    from llmfeat.spark_jobs.compress import entity_args

    config_args(sub.add_parser("train-compressor", help="MARC compressor -> MLflow registry under an alias"))
    compress = sub.add_parser(
        "compress", help="<entity>_repr -> <side>_marc_v<N>_features (N: version at the alias)"
    )
    config_args(compress)
    entity_args(compress)
    ev = sub.add_parser("eval-compression", help="layer sweep and compression baselines, table and plots")
    config_args(ev)
    sweep_args(ev)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmfeat")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfeat", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmfeat {package_version()}")
    verbose_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("ingest", "raw data -> Delta tables items, users, interactions, behaviors, user_behaviors"),
        ("refresh", "the daily refresh: encode new snapshots and items, compress, materialize"),
        ("tables", "list the Delta tables, their versions and row counts"),
        ("user-state", "every user's events in time order -> user_state_item_marc_v<N> (fresh state)"),
    ):
        config_args(sub.add_parser(name, help=help_))
    from llmfeat.spark_jobs import push

    push_parser = sub.add_parser("push", help="a file of events -> the online state (as POST /events)")
    config_args(push_parser)
    push.add_arguments(push_parser)
    maintain = sub.add_parser("maintain", help="compact and vacuum the Delta tables (delta.retention_hours)")
    config_args(maintain)
    maintain.add_argument("--table", action="append", default=[], help="only this table (repeatable)")
    encode_parser = sub.add_parser("encode", help="entity texts -> <entity>_repr tables of LLM layer states")
    config_args(encode_parser)
    encode_parser.add_argument(
        "--entity", default="all", help="items, users, behaviors, a comma list, or all (default: all)"
    )
    demo = sub.add_parser("demo", help="run the end-to-end job on the embedded defaults")
    demo.add_argument("--full", action="store_true", help="all layers, full-length user texts (slow on CPU)")
    config_args(demo)
    sub.add_parser("env", help="versions and locations of Python, Java and the libraries")
    features = sub.add_parser(
        "features", help="Feast: publish, apply and materialize (default), apply only, or init DIR"
    )
    features.add_argument("action", nargs="?", choices=["materialize", "apply", "init"], default=None)
    features.add_argument("dir", nargs="?", default=None, help="init: where to write the repository")
    features.add_argument("--full", action="store_true", help="materialize the whole history again")
    config_args(features)
    marc_parsers(sub)
    from llmfeat.job_args import ablation_args

    ablation = sub.add_parser(
        "ctr-ablation",
        help="what LLM features add to ids, counters and content: daily, fresh and cold-item protocols, "
        "either model family, by slice and layer",
    )
    config_args(ablation)
    ablation_args(ablation)
    from llmfeat.cli import ctr_commands, rec_commands

    ctr_commands.add_parsers(sub, config_args)
    rec_commands.add_parsers(sub, config_args)
    from llmfeat.cli import bahe_commands

    bahe_commands.add_parser(sub, config_args)
    args = parser.parse_args(argv)
    if args.command in ctr_commands.COMMANDS:
        return ctr_commands.dispatch(args)
    if args.command == "bahe":
        return bahe_commands.command(args)
    if args.command in rec_commands.COMMANDS:
        return rec_commands.dispatch(args)
    if args.command in ("train-compressor", "compress", "eval-compression"):
        return marc_command(args)
    if args.command == "features":
        return features_command(args)
    if args.command == "ctr-ablation":
        from llmfeat.spark_jobs import ctr_ablation

        return ctr_ablation.command(args)
    if args.command == "refresh":
        from llmfeat.spark_jobs.refresh import run as refresh

        return run_job("refresh", args.config, args.overrides, refresh)
    if args.command == "maintain":
        return maintain_command(args)
    if args.command == "user-state":
        from llmfeat.spark_jobs.user_state import run as user_state

        return run_job("user-state", args.config, args.overrides, lambda s, c: print(user_state(s, c)))
    if args.command == "push":
        return push.command(args)
    if args.command == "env":
        print(environment())
        return 0
    if args.command == "tables":
        try:
            from llmfeat.delta_io import tables_summary

            print(tables_summary(load_settings(args.config, args.overrides)))
        except ConfigError as err:
            print(f"llmfeat tables: config error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "ingest":
        from llmfeat.spark_jobs.ingest import find_source, format_summary
        from llmfeat.spark_jobs.ingest import run as ingest

        return run_with_session(
            "ingest",
            args.config,
            args.overrides,
            lambda s, c: print(format_summary(ingest(s, c))),
            before_session=find_source,
        )
    if args.command == "encode":
        return encode_command(args)
    from llmfeat.cli.demo import run as run_demo

    return run_job("demo", args.config, args.overrides, lambda s, c: run_demo(s, c, args.full))


if __name__ == "__main__":
    sys.exit(main())
