"""Analysis of the online experiment from the ranking service's event log: an A/B split or interleaving.

    llmfeat abtest analyze [--log DIR]
    spark-submit spark_jobs/abtest.py --config local [--log DIR]

Impressions: the items a ranking request showed (the service logs one line per request with its top
serving.slots; logs from before that, one line per ranked item, count those with rank < serving.slots);
clicks: click events on such an impression (joined by request id and item). Per arm: users, requests,
impressions, clicks, CTR, eCPM (bid rule in models/evaluation/ab_stats.py: a click on item j pays
item_bid(j), uniform in [abtest.bid_min, abtest.bid_max) by a stable hash of j; eCPM = 1000 * revenue /
impressions). Lift of the challenger over the champion for CTR
and eCPM with 95% intervals from resampling users (the unit of randomisation), and a sample-ratio-mismatch
test of users per arm against serving.challenger_share. One MLflow run, tagged with both model versions and
their training runs; both model versions get a tag pointing back at it. Needs no Spark: `run` takes
`spark=None`.

A log of `serving.experiment: interleave` (one line per request with both rankings, the teams, the coin) is
analysed as interleaving (models/evaluation/interleaving.py): the challenger's share of credited clicks with
ties excluded, the share of users it won, a sign test, intervals that resample users and redraw the coins
(re-drafting from the logged rankings; an item the re-draft shows and the log did not counts as unclicked).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmfeat.errors import UserError
from llmfeat.models.evaluation.ab_stats import Arm, item_bid, lift_interval, srm_test
from llmfeat.models.evaluation.interleaving import Draft, InterleavingResult, analyze_draft
from llmfeat.models.evaluation.metrics import Interval
from llmfeat.registry import use_ctr_tracking
from llmfeat.serving.event_log import read_events

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.config import Settings

ARMS = ("champion", "challenger")


@dataclass(frozen=True)
class AbResult:
    per_arm: pd.DataFrame  # one row per arm
    ctr_lift: Interval
    ecpm_lift: Interval
    srm_p: float
    srm_alarm: bool
    versions: dict[str, str]  # arm -> model versions seen (comma list)
    model: str
    run_id: str = ""

    def report(self, bid_rule: str) -> str:
        srm = "MISMATCH: do not trust the lift" if self.srm_alarm else "no mismatch"
        return "\n".join(
            [
                "online A/B (replayed held-out traffic through the ranking service):",
                self.per_arm.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
                f"CTR lift challenger vs champion: {self.ctr_lift.mean:+.2%} "
                f"[{self.ctr_lift.low:+.2%}, {self.ctr_lift.high:+.2%}] (95% CI, users resampled)",
                f"eCPM lift: {self.ecpm_lift.mean:+.2%} "
                f"[{self.ecpm_lift.low:+.2%}, {self.ecpm_lift.high:+.2%}] ({bid_rule})",
                f"sample-ratio check (users per arm): p = {self.srm_p:.3g}, {srm}",
            ]
        )


IMPRESSION_KEYS = ("request_id", "user_id", "arm", "model", "model_version")


def shown_items(events: list[dict], slots: int) -> pd.DataFrame:
    """One row per shown item (request, user, arm, model, version, item, rank) from the impression lines."""
    rows = []
    for e in events:
        if e.get("type") != "impression":
            continue
        head = tuple(e[k] for k in IMPRESSION_KEYS)
        if "items" in e:  # one line per request: what was shown, best first
            rows += [(*head, item, rank) for rank, item in enumerate(e["items"])]
        elif e["rank"] < slots:  # an older log: one line per ranked item
            rows.append((*head, e["item_id"], e["rank"]))
    return pd.DataFrame(rows, columns=[*IMPRESSION_KEYS, "item_id", "rank"])


def impressions_and_clicks(events: list[dict], slots: int) -> pd.DataFrame:
    """One row per shown item: request, user, arm, version, item, rank, click (0/1)."""
    shown = shown_items(events, slots)
    if shown.empty:
        raise UserError("the event log has no impressions: replay traffic first (`llmfeat abtest replay`)")
    clicks = pd.DataFrame(
        [(e["request_id"], e["item_id"]) for e in events if e.get("type") == "click"],
        columns=["request_id", "item_id"],
    ).drop_duplicates()
    clicks["click"] = 1
    shown = shown.merge(clicks, on=["request_id", "item_id"], how="left")
    shown["click"] = shown["click"].fillna(0).astype(int)
    return shown


def arm_totals(shown: pd.DataFrame, arm: str, bid_min: float, bid_max: float) -> Arm:
    rows = shown[shown["arm"] == arm].copy()
    rows["revenue"] = rows["click"] * rows["item_id"].map(lambda i: item_bid(str(i), bid_min, bid_max))
    per_user = rows.groupby("user_id").agg(
        imps=("click", "size"), clicks=("click", "sum"), rev=("revenue", "sum")
    )
    return Arm(
        per_user["imps"].to_numpy(float), per_user["clicks"].to_numpy(float), per_user["rev"].to_numpy(float)
    )


def analyze_events(events: list[dict], settings: Settings) -> AbResult:
    cfg, share = settings.abtest, settings.serving.challenger_share
    shown = impressions_and_clicks(events, settings.serving.slots)
    arms = {a: arm_totals(shown, a, cfg.bid_min, cfg.bid_max) for a in ARMS}
    per_arm = pd.DataFrame(
        [
            {
                "arm": a,
                "versions": ",".join(
                    sorted(shown.loc[shown["arm"] == a, "model_version"].astype(str).unique())
                ),
                "users": arm.users,
                "requests": shown.loc[shown["arm"] == a, "request_id"].nunique(),
                "impressions": int(arm.impressions.sum()),
                "clicks": int(arm.clicks.sum()),
                "ctr": arm.ctr,
                "ecpm": arm.ecpm,
            }
            for a, arm in arms.items()
        ]
    )
    srm_p = srm_test([arms["champion"].users, arms["challenger"].users], [1 - share, share])
    a, b = arms["champion"], arms["challenger"]
    return AbResult(
        per_arm=per_arm,
        ctr_lift=lift_interval(a, b, "clicks", cfg.n_boot, cfg.seed),
        ecpm_lift=lift_interval(a, b, "revenue", cfg.n_boot, cfg.seed),
        srm_p=srm_p,
        srm_alarm=bool(srm_p < cfg.srm_alpha),
        versions=dict(zip(per_arm["arm"], per_arm["versions"], strict=True)),
        model=str(shown["model"].iloc[0]) if len(shown) else settings.ctr.registry_name,
    )


@dataclass(frozen=True)
class InterleaveResult:
    result: InterleavingResult
    versions: dict[str, str]  # arm -> model versions seen (comma list)
    model: str
    run_id: str = ""

    def report(self, bid_rule: str = "") -> str:
        a, b = self.result.credits
        return "\n".join(
            [
                "online interleaving (team draft of both arms in every request):",
                f"champion v{self.versions['champion']}: {a:,} credited clicks; "
                f"challenger v{self.versions['challenger']}: {b:,}",
                self.result.line(),
            ]
        )


def interleaved(events: list[dict], slots: int, n_boot: int, seed: int) -> InterleaveResult | None:
    """The interleaving analysis of the log's interleaved requests; None when it has none."""
    lines = [e for e in events if e.get("type") == "impression" and e.get("experiment") == "interleave"]
    if not lines:
        return None
    clicked: dict[str, set[str]] = {}
    for e in events:
        if e.get("type") == "click":
            clicked.setdefault(e["request_id"], set()).add(e["item_id"])
    draft = Draft.of(
        [str(e["user_id"]) for e in lines],
        [e["rankings"]["champion"] for e in lines],
        [e["rankings"]["challenger"] for e in lines],
        [clicked.get(e["request_id"], set()) for e in lines],
        [e["first"] == "champion" for e in lines],
        slots,
    )
    versions = {arm: ",".join(sorted({str(e["versions"][arm]) for e in lines})) for arm in ARMS}
    return InterleaveResult(analyze_draft(draft, n_boot, seed), versions, str(lines[0]["model"]))


def bid_rule(settings: Settings) -> str:
    cfg = settings.abtest
    return (
        f"bid assumption: a click on item j pays a CPC in [{cfg.bid_min:g}, {cfg.bid_max:g}) by a hash of j"
    )


def analyze(settings: Settings, folder: Path) -> AbResult | InterleaveResult:
    """Analyse the log in `folder` and record it as an MLflow run linked to both model versions."""
    import mlflow

    events = list(read_events(folder))
    result: AbResult | InterleaveResult
    cfg = settings.abtest
    found = interleaved(events, settings.serving.slots, cfg.n_boot, cfg.seed)
    result = found or analyze_events(events, settings)
    use_ctr_tracking(settings)
    client = mlflow.MlflowClient()
    tags = {f"abtest.{arm}_versions": v for arm, v in result.versions.items()} | {
        "abtest.model": result.model,
        "abtest.log": str(folder),
        "abtest.experiment": "interleave" if isinstance(result, InterleaveResult) else "ab",
    }
    if isinstance(result, AbResult):
        tags |= {"abtest.srm_alarm": str(result.srm_alarm).lower(), "abtest.bid_rule": bid_rule(settings)}
    for arm, versions in result.versions.items():
        for v in filter(None, versions.split(",")):
            run = client.get_model_version(result.model, v).run_id
            tags[f"abtest.{arm}_train_run.v{v}"] = str(run)
    name = "abtest-" + "-vs-".join(f"v{result.versions[a]}" for a in ARMS)
    with mlflow.start_run(run_name=name, tags=tags) as run:
        if isinstance(result, AbResult):
            _log_result(result, settings)
        else:
            _log_interleaving(result)
    for versions in result.versions.values():
        for v in filter(None, versions.split(",")):
            client.set_model_version_tag(result.model, v, "abtest.run_id", run.info.run_id)
    return replace(result, run_id=run.info.run_id)


def run(
    spark: SparkSession | None, settings: Settings, log_dir: Path | str | None = None
) -> AbResult | InterleaveResult:
    """Analyse the event log in `log_dir` (default: serving.log_dir) and record it in MLflow (`analyze`).
    Reads JSON lines: `spark` is unused."""
    from llmfeat.serving.ranking_service import log_dir as serving_log_dir  # imports FastAPI

    return analyze(settings, Path(log_dir) if log_dir else serving_log_dir(settings))


def format_result(settings: Settings, result: AbResult | InterleaveResult) -> str:
    return f"{result.report(bid_rule(settings))}\nMLflow run {result.run_id}"


def _log_interleaving(result: InterleaveResult) -> None:
    import mlflow

    r = result.result
    metrics = {"il_requests": r.requests, "il_users": r.users, "il_sign_p": r.sign_p}
    metrics |= {"il_champion_credits": r.credits[0], "il_challenger_credits": r.credits[1]}
    for name, iv in (("il_share", r.credit_share), ("il_user_share", r.user_share)):
        metrics |= {name: iv.mean, f"{name}_low": iv.low, f"{name}_high": iv.high}
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_text(result.report(), "abtest.txt")


def _log_result(result: AbResult, settings: Settings) -> None:
    import mlflow

    metrics = {"srm_p": result.srm_p}
    for row in result.per_arm.to_dict("records"):
        for key in ("users", "requests", "impressions", "clicks", "ctr", "ecpm"):
            metrics[f"{row['arm']}_{key}"] = float(row[key])
    for name, iv in (("ctr_lift", result.ctr_lift), ("ecpm_lift", result.ecpm_lift)):
        metrics |= {name: iv.mean, f"{name}_low": iv.low, f"{name}_high": iv.high}
    mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_params(
        {"slots": settings.serving.slots, "challenger_share": settings.serving.challenger_share}
        | {
            "bid_min": settings.abtest.bid_min,
            "bid_max": settings.abtest.bid_max,
            "salt": settings.serving.salt,
        }
    )
    mlflow.log_table(result.per_arm, "per_arm.json")
    mlflow.log_text(result.report(bid_rule(settings)), "abtest.txt")


def main(argv: list[str] | None = None) -> int:
    from llmfeat.runner import config_args, run_in_process

    parser = argparse.ArgumentParser(prog="abtest")
    config_args(parser)
    parser.add_argument("--log", default=None, help="event-log folder (default: serving.log_dir)")
    args = parser.parse_args(argv)
    return run_in_process(
        "abtest", args.config, args.overrides, lambda s: print(format_result(s, run(None, s, args.log)))
    )


if __name__ == "__main__":
    # spark-submit runs this file as __main__; run the package's copy so the CLI catches its error classes.
    from llmfeat.spark_jobs.abtest import main as package_main

    sys.exit(package_main())
