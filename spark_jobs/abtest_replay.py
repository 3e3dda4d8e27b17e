"""The online experiment replayed in time order through the production path, in a workspace of its own.

    llmfeat abtest run [--days N]
    spark-submit spark_jobs/abtest_replay.py --config local [--days N]

The workspace, <data_dir>/<abtest.workspace>/run-<time>/, holds everything the replay writes: feast/ (a copy
of the Feast registry and a new SQLite online store), mlflow/ (a copy of the MLflow store: the aliases
resolve as in the live registry; the weakened ranker is registered here only), delta/ (the events the
service appends) and log/ (the service's event log). The live online store, registry and tables are only
read. The analysis is recorded in the live MLflow store, linked to both versions like `abtest analyze`.

1. The feature repository is applied to the copy (the online tables are created empty).
2. Two known losers, registered in the copy only: the weakened ranker, the champion's family without its
   counters and ids (trained on abtest.weakened_service, item content, with every id hidden; alias
   `weakened`), and a ranker that knows nothing (items in a fixed order by a hash of their ids; alias
   `no-information`).
3. The online store as of the test period's start: every daily view the three rankers read, and the item
   vectors the event path folds into the user state, materialized up to then; the state views' newest rows
   stamped before then.
4. `llmfeat serve` on the workspace interleaves champion and challenger, with the known losers as shadow
   arms; serving/replay.py replays the first abtest.days days of the test period in event order
   (ratings through POST /events), materializing the daily views at each midnight, and refuses any reply
   that read a value stamped at or after its request_time.
5. The service's log is analysed as the live interleaving experiment (spark_jobs/abtest.py), and the
   sensitivity table (models/evaluation/sensitivity.py) compares A/A, challenger vs champion and each known
   loser vs champion, each under the A/B split and under interleaving, all from the one pass.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmfeat.config import with_changes
from llmfeat.errors import UserError
from llmfeat.models.evaluation.sensitivity import DesignComparison, Replayed, compare, table
from llmfeat.reprs import MarcView
from llmfeat.serving.arms import assign_arm
from llmfeat.serving.replay import Timeline, TimelineSummary, replay_timeline, running_service
from llmfeat.serving.state_store import micros_to_datetime, state_version
from llmfeat.spark_jobs.abtest import InterleaveResult, analyze

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings
    from llmfeat.delta_io import DeltaTables

WEAKENED = "weakened"
NO_INFO = "no-information"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ReplayResult:
    summary: TimelineSummary
    live: InterleaveResult
    comparisons: list[DesignComparison]
    workspace: Path
    weakened_version: str

    def report(self) -> str:
        pair = next(c for c in self.comparisons if c.b == "challenger")
        ab = pair.ab.lift
        return "\n".join(
            [
                str(self.summary),
                self.summary.as_of_line(),
                self.live.report(),
                f"the same pair as an A/B split by user: CTR lift {ab.mean:+.2%} "
                f"[{ab.low:+.2%}, {ab.high:+.2%}] (95%, users resampled; {pair.ab.users} users)",
                f"sensitivity (weakened: v{self.weakened_version} in the workspace registry, the champion's "
                "family without its counters and ids; no-information: items in a fixed order by id hash):",
                table(self.comparisons),
                f"MLflow run {self.live.run_id}; workspace {self.workspace}",
            ]
        )


def workspace_settings(settings: Settings, root: Path, uri: str) -> Settings:
    """The settings the replay's service and jobs run with: everything they write goes under `root`; the
    MLflow store `uri` is copied there."""
    if not uri.startswith("sqlite:///"):
        raise UserError(
            f"abtest run copies the MLflow store to replay in isolation, and {uri} is not a SQLite file of "
            "this machine's: point mlflow.tracking_uri (or MLFLOW_TRACKING_URI) at one"
        )
    from llmfeat.feast_repo import store_dir

    registry = store_dir(settings) / "registry.db"
    if not registry.is_file():
        raise UserError(f"abtest run copies the Feast registry file {registry}, which is not there: run "
                        "`llmfeat features` first (a SQL registry is not copied)")  # fmt: skip
    (root / "feast").mkdir(parents=True)
    shutil.copy(registry, root / "feast" / "registry.db")
    (root / "mlflow").mkdir()
    shutil.copy(uri.removeprefix("sqlite:///"), root / "mlflow" / "mlflow.db")
    serving = settings.serving
    return with_changes(
        settings,
        {
            "feast.repo_dir": str(root / "feast"),
            "feast.online_store": "sqlite",
            "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            "ctr.experiment": f"{settings.ctr.experiment}-replay",
            "serving.log_dir": str(root / "log"),
            "serving.events_root": str(root / "delta"),
            "serving.experiment": "interleave",
            "serving.shadow_aliases": [WEAKENED, NO_INFO],
            "serving.workers": 1,
            "serving.flush_every": max(serving.flush_every, 1000),
        },
    )


def weaken(settings: Settings) -> str:
    """The champion's family trained on abtest.weakened_service (item content only) with every fit row's
    ids hidden (ctr.id_dropout=1), registered in the copy under `weakened`; -> its version. Served without
    counters alone, the champion did not lose: its item ids say what the item counters say."""
    import mlflow

    from llmfeat.registry import use_ctr_tracking
    from llmfeat.spark_jobs.train_ctr import run as train

    use_ctr_tracking(settings)
    champion = mlflow.MlflowClient().get_model_version_by_alias(
        settings.ctr.registry_name, settings.serving.champion_alias
    )
    weak = with_changes(
        settings,
        {
            "ctr.kind": champion.tags.get("model.family", settings.ctr.kind),
            "ctr.id_feature_service": settings.abtest.weakened_service,
            "ctr.id_dropout": 1.0,
        },
    )
    (trained,) = train(None, weak, use_llm=False, alias=WEAKENED)
    return str(trained.version)


def register_no_info(settings: Settings) -> str:
    """The ranker that knows nothing (models/ctr/pyfunc.py NoInfoRanker), registered in the copy under
    `no-information` and served the weakened service; -> its version."""
    import mlflow
    import pandas as pd

    from llmfeat.models.ctr.pyfunc import NoInfoRanker, log_ranker
    from llmfeat.registry import use_ctr_tracking

    use_ctr_tracking(settings)
    name = settings.ctr.registry_name
    with mlflow.start_run(run_name="no-information ranker"):
        info = log_ranker(NoInfoRanker(), pd.DataFrame({"user_id": ["u"], "item_id": ["i"]}), name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (("feast.feature_service", settings.abtest.weakened_service), ("model.family", "none")):
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, NO_INFO, version)
    return version


def served_views(settings: Settings, store: FeatureStore) -> tuple[list[str], list[Any]]:
    """(daily views, state views) the three rankers read; with a state view, the item vectors the event path
    folds into it."""
    import mlflow

    from llmfeat.registry import use_ctr_tracking
    from llmfeat.serving.features import service_fields

    use_ctr_tracking(settings)
    client, name = mlflow.MlflowClient(), settings.ctr.registry_name
    aliases = (settings.serving.champion_alias, settings.serving.challenger_alias, WEAKENED, NO_INFO)
    services = {client.get_model_version_by_alias(name, a).tags["feast.feature_service"] for a in aliases}
    views = {f.view.name for s in sorted(services) for f in service_fields(store, s)}
    if any(store.get_feature_view(v).tags.get("kind") == "state" for v in views):
        marc = MarcView("item", state_version(settings)).name
        views |= {marc, marc.removesuffix("_fv") + "_lineage_fv"}
    found = [store.get_feature_view(v) for v in sorted(views)]
    return [v.name for v in found if v.tags.get("kind") != "state"], [
        v for v in found if v.tags.get("kind") == "state"
    ]


def materialize_as_of(
    settings: Settings, tables: DeltaTables, store: FeatureStore, daily: list[str], at_us: int
) -> None:
    """The online store as of `at_us`: daily views up to just before it, states stamped before it."""
    from llmfeat.spark_jobs.materialize import materialize_state

    at = micros_to_datetime(at_us)
    store.materialize(start_date=EPOCH, end_date=at - timedelta(microseconds=1), feature_views=daily)
    materialize_state(None, settings, tables, store, before=at)


def test_rows(settings: Settings, tables: DeltaTables) -> Any:
    from llmfeat.sample import Sample

    columns = ["user_id", "item_id", "label", "event_timestamp"]
    return Sample(tables, settings.sample).read("interactions", columns, split=["test"]).to_pandas()


def sensitivity(settings: Settings, summary: TimelineSummary) -> list[DesignComparison]:
    """A/A, challenger vs champion, weakened vs champion, each under both designs."""
    requests = [
        Replayed(
            r.request.user_id,
            r.rankings,
            r.request.labels,
            None if r.first is None else r.first == "champion",
        )
        for r in summary.replayed
    ]
    cfg, slots = settings.abtest, settings.serving.slots
    in_b = {r.user: assign_arm(r.user, settings.serving) == "challenger" for r in requests}
    pairs = [
        ("A/A (champion vs itself)", "champion", "champion", False),
        ("challenger vs champion", "champion", "challenger", True),
        ("weakened vs champion", "champion", WEAKENED, False),
        ("no-information vs champion", "champion", NO_INFO, False),
    ]
    return [
        compare(requests, n, a, b, in_b, slots, cfg.n_boot, cfg.seed, served) for n, a, b, served in pairs
    ]


def log_sensitivity(settings: Settings, run_id: str, comparisons: list[DesignComparison], text: str) -> None:
    import mlflow
    import pandas as pd

    from llmfeat.registry import use_ctr_tracking

    use_ctr_tracking(settings)
    with mlflow.start_run(run_id=run_id):
        frame = pd.DataFrame([c.row() for c in comparisons])
        mlflow.log_table(frame, "sensitivity.json")
        mlflow.log_text(text, "replay.txt")
        for c in comparisons:  # metrics named by the ranker compared with the champion: aa_, challenger_, ...
            prefix = "aa" if c.a == c.b else c.b.replace("-", "_")
            row = {k: v for k, v in c.row().items() if isinstance(v, float) and np.isfinite(v)}
            mlflow.log_metrics({f"{prefix}_{k}": v for k, v in row.items()})


@dataclass
class Workspace:
    """A replay ready to run: its settings, Feast store (the copy), timeline and the views it materializes."""

    root: Path
    settings: Settings
    store: FeatureStore
    timeline: Timeline
    daily: list[str]
    push: bool  # ratings go through POST /events: some ranker reads the fresh state they update
    weakened_version: str
    materialized_to: int  # epoch microseconds

    def at_midnight(self, at_us: int) -> None:
        """The nightly job: the daily views from the last materialization up to this midnight."""
        start, end = micros_to_datetime(self.materialized_to), micros_to_datetime(at_us)
        self.store.materialize(start_date=start, end_date=end, feature_views=self.daily)
        self.materialized_to = at_us


def prepare(settings: Settings, days: int | None = None, store_uri: str | None = None) -> Workspace:
    """Steps 1-3 of the module docstring: a new workspace with the online store as of the replay's start.
    The MLflow store copied is `store_uri` (default: `tracking_uri(settings)`), and the workspace's settings
    name the copy: inside `mlflow run`, call it within `set_aside_env`, as `run` does."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.feast_repo import apply_repo
    from llmfeat.registry import tracking_uri

    days = days or settings.abtest.days
    if days < 1:
        raise UserError(f"--days must be at least 1, got {days}")
    run_name = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    root = Path(settings.data_dir) / settings.abtest.workspace / run_name
    ws = workspace_settings(settings, root, store_uri or tracking_uri(settings))
    print(f"replay workspace {root}")
    store = apply_repo(ws)
    version = weaken(ws)
    print(f"weakened ranker: v{version}, {settings.abtest.weakened_service} without ids or counters")
    print(f"no-information ranker: v{register_no_info(ws)}, items in a fixed order by a hash of their ids")
    tables = RustDelta(settings.delta_root)
    timeline = Timeline.of(test_rows(settings, tables), settings.abtest.candidates, days)
    daily, states = served_views(ws, store)
    materialize_as_of(ws, tables, store, daily, timeline.start_us)
    print(
        f"online store as of {micros_to_datetime(timeline.start_us).isoformat()}: {len(daily)} daily views, "
        f"{len(states)} state views; {len(timeline.requests):,} requests and {len(timeline.events):,} events "
        f"over {days} days"
    )
    return Workspace(root, ws, store, timeline, daily, bool(states), version, timeline.start_us)


def finish(settings: Settings, ws: Workspace, summary: TimelineSummary) -> ReplayResult:
    """Step 5: the live experiment from the service's log, the sensitivity table, both in MLflow."""
    live = analyze(settings, ws.root / "log")
    if not isinstance(live, InterleaveResult):
        raise RuntimeError(f"the replay's service did not interleave: see {ws.root / 'log'}")
    comparisons = sensitivity(settings, summary)
    result = ReplayResult(summary, live, comparisons, ws.root, ws.weakened_version)
    log_sensitivity(settings, live.run_id, comparisons, result.report())
    return result


def run(spark: SparkSession | None, settings: Settings, days: int | None = None) -> ReplayResult:
    """Replay the test period's first `days` days (default abtest.days) in a new workspace. Reads Delta with
    delta-rs: `spark` is unused."""
    from llmfeat.registry import set_aside_env, tracking_uri

    live = tracking_uri(settings)
    with set_aside_env():  # under `mlflow run`, the copy (named in the workspace's settings) is the store
        ws = prepare(settings, days, live)
        with running_service(ws.settings) as url:
            summary = replay_timeline(url, ws.timeline, ws.at_midnight, push=ws.push)
    return finish(settings, ws, summary)  # recorded in the live store (the `mlflow run` run, if any)


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="abtest_replay")
    config_args(parser)
    parser.add_argument(
        "--days", type=int, default=None, help="days of the test period (default abtest.days)"
    )
    args = parser.parse_args(argv)
    return run_in_process(
        "abtest_replay", args.config, args.overrides, lambda s: print(run(None, s, args.days).report())
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.abtest_replay import main as package_main

    sys.exit(package_main())
