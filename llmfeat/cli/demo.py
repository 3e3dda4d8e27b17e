"""`llmfeat demo`: the whole pipeline on the embedded defaults, in order, on one machine.

On CPU the LLM is the slow part, so by default the demo encodes only the compressor's source layer and cuts
user texts to their newest ~55 tokens (`DEMO_SAMPLE`: 3,458 daily user snapshots on ML-100k, one per user and
day with new behaviour, plus each user's first appearance); every other step runs on the full ML-100k tables.
`llmfeat demo --full` (or `make demo FULL=1`) encodes every configured layer at full text length.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from llmfeat.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from llmfeat.registry import RegisteredCompressor

# What the CPU sample changes, and why: one tapped layer stops the forward pass half-way through SmolLM2,
# and shorter user texts keep the encode of every user snapshot within a few minutes on 2 cores.
FRESH_SERVICE, FRESH_VERSION = "ctr_fresh_marc_v1", 1  # feature_repo/feature_services.py: the state over v1
FRESH_ID_SERVICE = "ctr_fresh_id_v1"  # the same fresh counters without the LLM's item vectors and history
FAMILIES = ("lightgbm", "dnn")  # the demo trains both and keeps the one that wins on validation
DEMO_SAMPLE = {"layers": "the compressor's source layer only (marc.layer)", "user_max_chars": 200}


def demo_settings(settings: Settings, full: bool) -> Settings:
    if full:
        return settings.model_copy(update={"state": state_over_fresh_service(settings)})
    encode = settings.encode.model_copy(
        update={"layers": [settings.marc.layer], "user_max_chars": DEMO_SAMPLE["user_max_chars"]}
    )
    return settings.model_copy(update={"encode": encode, "state": state_over_fresh_service(settings)})


def run(spark: SparkSession, settings: Settings, full: bool = False) -> None:
    from llmfeat.delta_io import tables_summary
    from llmfeat.spark_jobs.ingest import format_summary
    from llmfeat.spark_jobs.ingest import run as ingest
    from llmfeat.validation.data_docs import where_note

    settings = demo_settings(settings, full)
    started = time.monotonic()
    if not full:
        print(
            f"demo sample on CPU: encode {DEMO_SAMPLE['layers']}, user texts cut to "
            f"{DEMO_SAMPLE['user_max_chars']} characters (llmfeat demo --full for everything)"
        )
    print("== ingest (MovieLens-100k from the recbole package -> Delta, input checks before any commit)")
    print(format_summary(ingest(spark, settings)))
    print("\n== published")
    print(tables_summary(settings))
    print("\n== validation (a great-expectations gate runs before every commit)")
    print(where_note(settings))
    encode_step(spark, settings)
    marc_step(spark, settings)
    features_step(spark, settings)
    state_step(spark, settings)
    ctr_step(fresh_challenger(settings))
    bahe_step(spark, settings)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")


def encode_step(spark: SparkSession, settings: Settings) -> None:
    """Demo: encode items and user snapshots (what the compressor needs); incremental, so a re-run costs
    seconds. On CPU the real SmolLM2 does about 8 item texts/s; users' longer texts take longer."""
    print("\n== encode (LLM layer states -> items_repr, user_snapshots_repr; only new or changed texts)")
    from llmfeat.spark_jobs.encode import run_all

    run_all(spark, settings, ["items", "user_snapshots"])


def marc_step(spark: SparkSession, settings: Settings) -> None:
    """Demo: train a compressor for a few epochs on the representation tables, register it, compress both
    tables. Skipped, with a note, when the representation tables are not there yet."""
    from llmfeat.delta_io import open_tables
    from llmfeat.registry import resolve_alias
    from llmfeat.reprs import repr_table
    from llmfeat.spark_jobs.compress import DEFAULT_ENTITIES
    from llmfeat.spark_jobs.compress import run as compress
    from llmfeat.spark_jobs.train_compressor import run as train

    tables = open_tables(settings, spark)
    missing = [repr_table(e) for e in DEFAULT_ENTITIES if not tables.exists(repr_table(e))]
    print("\n== MARC compressor (train a few epochs -> MLflow registry @alias -> compress to feature tables)")
    if missing:
        print(f"skipped: {', '.join(missing)} not found; run `llmfeat encode --entity user_snapshots,items`")
        return
    try:
        registered: RegisteredCompressor | None = resolve_alias(settings, "users")
    except LookupError:
        registered = None
    if registered is None:
        # The demo's sample: 20,000 train rows, 2 epochs (a few minutes on 2 cores); the full fit is
        # `llmfeat train-compressor`.
        quick = settings.marc.model_copy(
            update={"max_epochs": min(settings.marc.max_epochs, 2), "max_fit_rows": 20000}
        )
        print(train(spark, settings.model_copy(update={"marc": quick})))
    else:  # a re-run: the compressor the first run registered (`llmfeat train-compressor` makes a new one)
        print(f"{registered.name} v{registered.version} @{registered.alias}: registered earlier, reused")
    for summary in compress(spark, settings):
        print(summary)
    print(
        "full evaluation (layer sweep, baselines, plots): llmfeat eval-compression; results in docs/marc.md"
    )


def features_step(spark: SparkSession, settings: Settings) -> None:
    """Publish and materialize what exists, then one ranking-request fetch when the vectors are online."""
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store, service_marc_views, store_dir
    from llmfeat.serving.features import OnlineFeatures
    from llmfeat.spark_jobs.materialize import format_published
    from llmfeat.spark_jobs.materialize import run as materialize

    where = f"stores in {store_dir(settings)}, online {settings.feast.online_store}"
    print(f"\n== features (Feast repository feature_repo/, {where})")
    published = materialize(spark, settings)
    print(format_published(published))
    pinned = {m.name for m in service_marc_views(settings.ctr.llm_feature_service)}
    if not all(p.version >= 0 for p in published if p.view in pinned):
        print(
            "user/item vectors not published yet: run `llmfeat compress`, then `llmfeat features materialize`"
        )
        return
    items = [
        r[0] for r in open_tables(settings, spark).read_spark("items").select("item_id").limit(100).collect()
    ]
    online = OnlineFeatures(open_store(settings), online_store=settings.feast.online_store)
    batch = online.fetch("1", items)
    print(
        f"ranking request: user 1 x {len(items)} items -> user {batch.user.shape}, items {batch.items.shape} "
        f"{batch.items.dtype}, missing items {int(batch.item_missing.sum())}"
    )


def bahe_step(spark: SparkSession, settings: Settings) -> None:
    """Behaviour table, training and publication on a sample (bahe.demo_users; 0 = everyone), then Feast."""
    from llmfeat.spark_jobs import bahe, bahe_encode
    from llmfeat.spark_jobs.materialize import format_published
    from llmfeat.spark_jobs.materialize import run as materialize

    n, conf = settings.bahe.demo_users, settings.bahe
    sample = f"{n} users with the shortest histories (--set bahe.demo_users=0 for all)" if n else "all users"
    print(
        f"\n== BAHE: behaviours through blocks 1..{conf.layer}, {conf.deep_layers} trainable "
        f"{conf.deep} blocks over each user's behaviours -> {conf.feature_table}; sample: {sample}"
    )
    print(bahe_encode.run(spark, settings, n))
    print(bahe.run(spark, settings, n))
    print(format_published(materialize(spark, settings)))


def state_step(spark: SparkSession, settings: Settings) -> None:
    """The fresh state: every event in time order over the published item vectors, then online."""
    from llmfeat.delta_io import open_tables
    from llmfeat.feast_repo import open_store
    from llmfeat.spark_jobs.materialize import format_published, materialize_state
    from llmfeat.spark_jobs.user_state import run as user_state

    print("\n== fresh user state (each user's events in time order over the LLM item vectors)")
    print(user_state(spark, settings))
    print(
        format_published(
            materialize_state(spark, settings, open_tables(settings, spark), open_store(settings))
        )
    )


def state_over_fresh_service(settings: Settings) -> Any:
    """The state over the item vectors the fresh service reads (unless state.item_version says otherwise)."""
    if settings.state.item_version is not None:
        return settings.state
    return settings.state.model_copy(update={"item_version": FRESH_VERSION})


def fresh_challenger(settings: Settings) -> Settings:
    """The demo's pair reads the fresh features (counters and user state as of the previous event): the
    champion ids, fresh counters and content; the challenger adds the LLM item vector and LLM history."""
    services = {"llm_feature_service": FRESH_SERVICE, "id_feature_service": FRESH_ID_SERVICE}
    return settings.model_copy(update={"ctr": settings.ctr.model_copy(update=services)})


def train_pair(settings: Settings, families: tuple[str, ...] = FAMILIES) -> list[Any]:
    """Champion and challenger of each family; the family whose challenger has the better valid AUC gets
    the aliases (validation chooses, test is read once by the comparison). -> its two TrainedCtr."""
    import mlflow

    from llmfeat.cli.ctr_commands import train_models

    pairs = {}
    for family in families:
        kind = settings.model_copy(update={"ctr": settings.ctr.model_copy(update={"kind": family})})
        pairs[family] = train_models(kind, True, True, None)
        for trained in pairs[family]:
            print(trained.summary(), f"valid AUC {trained.valid['auc']}")
    chosen = max(pairs, key=lambda f: pairs[f][1].valid["auc"].mean)
    print(f"family chosen on validation: {chosen}")
    client = mlflow.MlflowClient()
    serving = settings.serving
    for trained, alias in zip(pairs[chosen], (serving.champion_alias, serving.challenger_alias), strict=True):
        client.set_registered_model_alias(trained.name, alias, trained.version)
    return pairs[chosen]


def warm_user(settings: Settings, url: str, items: list[str]) -> list[str]:
    """Events for a user the service has never seen, and the next /rank reading them: the lines to print."""
    from llmfeat.serving.arms import assign_arm

    run = time.strftime("%Y%m%d%H%M%S")  # a user no earlier demo has pushed events for
    user = next(
        f"new-user-{run}-{k}"
        for k in range(1000)
        if assign_arm(f"new-user-{run}-{k}", settings.serving) == "challenger"
    )
    before = post(url, "/rank", {"user_id": user, "item_ids": items})
    lines = [f"/rank for {user} (never seen): cold_user={before['cold_user']}, "
             f"missing_user_views={before['missing_user_views']}"]  # fmt: skip
    for k, (item, label) in enumerate(zip(items[:3], (1, 1, 0), strict=True)):
        pushed = post(
            url, "/events", {"event_id": f"{user}-{k}", "user_id": user, "item_id": item, "label": label}
        )
        lines.append(f"POST /events {user} {item} label={label}: applied={pushed['applied']}")
    after = post(url, "/rank", {"user_id": user, "item_ids": items})
    lines.append(f"/rank for {user} after 3 events: cold_user={after['cold_user']}, "
                 f"missing_user_views={after['missing_user_views']}")  # fmt: skip
    moved = {i["item_id"]: i["score"] for i in after["items"]}
    lines += [f"  {i['item_id']}: {i['score']:.4f} -> {moved[i['item_id']]:.4f}" for i in before["items"]]
    return lines


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import json
    import urllib.request

    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def ctr_step(settings: Settings) -> None:
    """Train with and without LLM features, compare offline, run the online A/B, promote by the rule."""
    from llmfeat.cli.ctr_commands import online_ab, run_compare
    from llmfeat.delta_io import RustDelta
    from llmfeat.feast_repo import service_marc_views

    tables = RustDelta(settings.delta_root)
    pinned = service_marc_views(settings.ctr.llm_feature_service)
    if not all(tables.exists(m.feast_table) for m in pinned):
        print(
            "\n== CTR models: skipped, no published LLM vectors yet (llmfeat compress; features materialize)"
        )
        return
    print("\n== CTR models (Feast training set -> MLflow runs and registry; both families)")
    train_pair(settings)
    print("\n== offline A/B (champion vs challenger, same held-out snapshot)")
    comparison = run_compare(settings, settings.serving.champion_alias, settings.serving.challenger_alias)
    print(comparison.report())
    print(
        f"\n== online experiment (the first {settings.abtest.days} test days replayed in event order through "
        "the ranking service: interleaving, and the same pair as an A/B split)"
    )
    online_ab(settings)
    print("\n== promotion (champion moves only if the offline comparison passes the promotion rule)")
    from llmfeat.spark_jobs.compare import record_promotion

    print(record_promotion(settings, comparison).summary())
    from llmfeat.registry import tracking_uri

    print("\n== events online (POST /events updates the fresh state; the next /rank reads it)")
    from llmfeat.serving.replay import running_service

    items = [r["item_id"] for r in tables.read_arrow("items").slice(0, 8).to_pylist()]
    with running_service(settings) as url:
        print("\n".join(warm_user(settings, url, items)))
    print(f"\nbrowse it: mlflow ui --backend-store-uri {tracking_uri(settings)}")
