"""Shared fixtures: one local SparkSession for the run, tiny deterministic data, settings in tmp_path."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmfeat.config import Settings, load_settings
from llmfeat.jvm_archive import java_options

# Every JVM the tests start is short-lived and works on a few rows: C1 only (conf/tiny.yaml says why), and
# the set-up's class archive (llmfeat/jvm_archive.py). The session adds them to the drivers it starts; these
# cover the JVMs started before any profile is read: spark-submit's driver (SPARK_SUBMIT_OPTS) and the
# standalone master and workers (SPARK_DAEMON_JAVA_OPTS).
TINY_JVM = load_settings("tiny").spark.extra["spark.driver.extraJavaOptions"]
SHORT_LIVED_JVM = f"{TINY_JVM} {java_options()}".strip()
os.environ.setdefault("SPARK_SUBMIT_OPTS", SHORT_LIVED_JVM)
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", SHORT_LIVED_JVM)

ITEMS = (
    "item_id,title,year,genres\n"
    "1,Toy Story,1995,Animation|Children's|Comedy\n"
    "2,GoldenEye,1995,Action|Adventure|Thriller\n"
    "3,Four Rooms,1995,Thriller\n"
    "4,Nameless,,\n"
)
USERS = "user_id,age,gender,occupation\n10,24,M,technician\n11,53,F,other\n12,23,M,writer\n"
# 10 interactions over 10 days: with 80/10/10 cuts, days 1-8 train, day 9 valid, day 10 test.
INTERACTIONS = "user_id,item_id,rating,timestamp\n" + "".join(
    f"{u},{i},{r},{ts}\n"
    for u, i, r, ts in [
        (10, 1, 5, 1_000_000_000),
        (10, 2, 3, 1_000_086_400),
        (11, 1, 4, 1_000_172_800),
        (11, 3, 2, 1_000_259_200),
        (12, 2, 5, 1_000_345_600),
        (12, 4, 1, 1_000_432_000),
        (10, 3, 4, 1_000_518_400),
        (11, 2, 5, 1_000_604_800),
        (12, 1, 3, 1_000_691_200),
        (10, 4, 4, 1_000_777_600),
    ]
)


# The longest files first (seconds on 2 cores, the suite's --durations): under `-n 2 --dist loadfile` a file
# runs on one worker, which is handed its next file while its last two tests run; a long file started last
# would leave the other worker idle at the end, so the files end with the shortest.
LONGEST_FIRST = (
    "test_cluster.py", "test_state_online.py", "test_ingest.py", "test_install.py",
    "test_encode_job.py", "test_mlflow_project_ctr.py", "test_mlflow_project.py", "test_ctr_stream.py",
    "test_bahe_job.py", "test_delta_io.py", "test_spark_submit.py", "test_compress.py",
    "test_user_state_job.py", "test_feast_materialize.py", "test_serving_ranking.py", "test_serving_load.py",
    "test_encoder.py", "test_mlflow_import.py", "test_feast_repo.py", "test_validation_spark.py",
    "test_materialize_engines.py", "test_validation_docs.py", "test_ctr_tree.py",
    "test_training_set_spark.py", "test_retrieval_services.py", "test_session.py", "test_lite.py",
    "test_ctr_training.py", "test_slmrec_slow.py", "test_sample.py", "test_ctr_ablation.py",
    "test_terminal.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def spark():  # type: ignore[no-untyped-def]
    from llmfeat.config import DeltaConf
    from llmfeat.session import build_session

    # With the delta-spark jars the set-up resolved, so that both Delta backends run in this one session.
    session = build_session(load_settings("tiny").spark, DeltaConf(backend="delta-spark"))
    yield session
    session.stop()


def write_sources(src: Path) -> Path:
    """Tiny CSV inputs in the layout `ingest.source: files` expects."""
    src.mkdir(parents=True)
    (src / "items.csv").write_text(ITEMS)
    (src / "users.csv").write_text(USERS)
    (src / "interactions.csv").write_text(INTERACTIONS)
    return src


def source_overrides(src: Path) -> list[str]:
    """The settings that point `ingest` at the tiny CSVs in `src`."""
    files = [f"ingest.files.{n}={src / f'{n}.csv'}" for n in ("interactions", "items", "users")]
    return ["ingest.source=files", *files]


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """Tiny CSV inputs in the layout `ingest.source: files` expects."""
    return write_sources(tmp_path / "src")


@pytest.fixture(scope="session")
def ingested_once(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """The tiny CSVs ingested once per worker (five gated tables): the data_dir tests copy."""
    from llmfeat.spark_jobs.ingest import run as ingest

    root = tmp_path_factory.mktemp("ingested")
    src = write_sources(root / "src")
    ingest(spark, load_settings("tiny", [f"data_dir={root / 'lake'}", *source_overrides(src)]))
    return root / "lake"


@pytest.fixture
def ingested(ingested_once: Path, tmp_path: Path) -> Path:
    """A copy of the ingested tiny lake at make_settings' data_dir (tmp_path/lake), as `ingest` leaves it."""
    return Path(shutil.copytree(ingested_once, tmp_path / "lake"))


@pytest.fixture
def make_settings(tmp_path: Path, source_dir: Path) -> Iterator[Callable[..., Settings]]:
    """Settings on the tiny profile, writing under tmp_path and reading the tiny CSVs."""

    def make(*overrides: str) -> Settings:
        return load_settings(
            "tiny", [f"data_dir={tmp_path / 'lake'}", *source_overrides(source_dir), *overrides]
        )

    yield make
