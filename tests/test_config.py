from pathlib import Path

import pytest

from llmfeat.config import ConfigError, load_settings
from llmfeat.paths import conf_dir

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("profile", ["local", "tiny", "cluster"])
def test_every_profile_loads(profile: str) -> None:
    settings = load_settings(profile)
    assert settings.profile == profile
    assert settings.data_dir.startswith("/")


def test_local_is_the_embedded_default() -> None:
    s = load_settings("local")
    assert (s.spark.master, s.delta.backend, s.ingest.source) == ("local[*]", "delta-rs", "ml-100k")


def test_cluster_profile_asks_for_gpus_and_delta_spark() -> None:
    s = load_settings("cluster")
    assert s.spark.gpu.executor_amount >= 1 and s.delta.backend == "delta-spark"


def test_set_overrides_nested_keys_with_typed_values() -> None:
    s = load_settings(
        "local", ["spark.master=local[2]", "spark.gpu.executor_amount=2", "ingest.test_frac=0.2"]
    )
    assert s.spark.master == "local[2]"
    assert s.spark.gpu.executor_amount == 2
    assert s.ingest.test_frac == 0.2


def test_set_accepts_free_keys_under_spark_extra() -> None:
    from llmfeat.session import session_conf

    s = load_settings("local", ["spark.extra.spark.executor.cores=4"])
    assert session_conf(s.spark)["spark.executor.cores"] == "4"


def test_unknown_key_in_file_names_key_file_and_allowed_keys(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  mastr: local[2]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(bad))
    msg = str(err.value)
    assert "spark.mastr" in msg and str(bad) in msg and "master" in msg and "gpu" in msg


def test_unknown_key_in_override_names_the_override() -> None:
    with pytest.raises(ConfigError, match=r"--set ingest.sauce=x.*allowed keys under ingest: source"):
        load_settings("local", ["ingest.sauce=x"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"delta.backend.*'parquet'"):
        load_settings("local", ["delta.backend=parquet"])


def test_id_dropout_is_the_valid_rate_or_a_probability() -> None:
    assert load_settings("tiny", ["ctr.id_dropout=0.3"]).ctr.id_dropout == 0.3
    with pytest.raises(ConfigError, match=r"ctr.id_dropout.*less than or equal to 1"):
        load_settings("tiny", ["ctr.id_dropout=1.5"])


def test_settings_are_frozen() -> None:
    s = load_settings("local")
    with pytest.raises(Exception, match="frozen"):
        s.spark.master = "x"  # type: ignore[misc]


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="cluster, local, tiny"):
        load_settings("nope")
    assert (conf_dir() / "local.yaml").exists()


def test_renamed_keys_keep_working_for_one_release_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One name per concept: an old key (in a profile or in --set) lands on its new name, and the warning
    names the new key; a value given under the new name wins over the old one."""
    profile = tmp_path / "old.yaml"
    profile.write_text(
        "mlflow: {alias: staging}\nbahe: {split_layer: 3, layer: 4}\ngate: {min_auc_lift: 0.01}\n"
    )
    with caplog.at_level("WARNING", logger="llmfeat.config"):
        s = load_settings(str(profile), ["lite.item_layer=7", "ctr.epochs=2", "bahe.baseline_layer=9"])
    assert (s.marc.alias, s.bahe.layer, s.promotion.min_auc_lift) == ("staging", 4, 0.01)
    assert (s.lite.layer, s.ctr.max_epochs, s.bahe.baseline.layer) == (7, 2, 9)
    text = caplog.text
    for old, new in [
        ("mlflow.alias", "marc.alias"),
        ("lite.item_layer", "lite.layer"),
        ("gate", "promotion"),
    ]:
        assert f"{old} is deprecated" in text and f"use {new}" in text
