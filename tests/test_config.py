import dataclasses

import pytest

from engagerec.config import ConfigError, config_changes, config_from_dict, load_config


def test_unknown_key_suggests_nearest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.split.test_fracton'; did you mean 'test_fraction'"
    ):
        config_from_dict({"data": {"split": {"test_fracton": 0.2}}})


def test_wrong_type_names_the_path():
    with pytest.raises(ConfigError, match=r"data.filters.min_user_views: expected an integer"):
        config_from_dict({"data": {"filters": {"min_user_views": "ten"}}})


def test_feature_list_is_typed():
    cfg = config_from_dict(
        {"data": {"features": [{"name": "genres", "kind": "multi_hot", "separator": "|"}]}}
    )
    assert cfg.data.features[0].separator == "|"
    with pytest.raises(ConfigError, match=r"data.features\[0\]"):
        config_from_dict({"data": {"features": [{"name": "x", "bucket": 3}]}})


def test_overrides_are_checked_like_the_file(repo):
    cfg = load_config(
        repo / "configs" / "kuairand_random.yaml",
        ["data.split.kind=temporal", "data.labels.1.threshold=0.3"],
    )
    assert cfg.data.split.kind == "temporal" and cfg.data.labels[1].threshold == 0.3
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        load_config(repo / "configs" / "kuairand_random.yaml", ["data.labels.1.treshold=0.3"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(repo / "configs" / "kuairand_random.yaml", ["data.labels.5.threshold=0.3"])


def test_every_shipped_config_loads(repo):
    for path in sorted((repo / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem or path.stem.startswith(("kuairand_", "paper_"))
        tower = path.stem.split("_", 1)[1]
        if path.stem.startswith(("kuairand_", "paper_")) and tower in (
            "cross_stitch",
            "mmoe",
            "ple",
            "shared_bottom",
            "single_task",
        ):
            assert cfg.model.tower.name == tower


def test_base_configs_are_merged_key_by_key(repo):
    cfg = load_config(repo / "configs" / "paper_ple.yaml")
    assert cfg.model.tower.name == "ple" and cfg.train.dense_lr == 1e-4  # from paper_protocol.yaml
    assert (
        cfg.data.source.adapter == "kuairand" and cfg.data.split.kind == "random"
    )  # from kuairand_random.yaml
    assert "user_id" not in [f.name for f in cfg.data.features]  # lists are replaced, not merged


def test_a_key_added_since_a_checkpoint_is_not_a_config_change():
    from engagerec.config import normalised_config

    cfg = load_config("kuairand_random")
    saved = dataclasses.asdict(cfg)
    for feature in saved["data"]["features"]:  # as a release before these keys wrote it
        for key in ("smoothing", "folds", "scheme"):
            feature.pop(key)
    assert config_changes(saved, dataclasses.asdict(cfg))  # raw, every feature differs
    assert config_changes(normalised_config(saved), dataclasses.asdict(cfg)) == []
