import pytest

from engagerec.config import ConfigError, config_from_dict, load_config


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.split.test_fracton'; did you mean 'test_fraction'"):
        config_from_dict({"data": {"split": {"test_fracton": 0.2}}})


def test_wrong_type_names_the_path():
    with pytest.raises(ConfigError, match=r"data.filters.min_user_views: expected an integer"):
        config_from_dict({"data": {"filters": {"min_user_views": "ten"}}})


def test_feature_list_is_typed():
    cfg = config_from_dict({"data": {"features": [{"name": "genres", "kind": "multi_hot", "separator": "|"}]}})
    assert cfg.data.features[0].separator == "|"
    with pytest.raises(ConfigError, match=r"data.features\[0\]"):
        config_from_dict({"data": {"features": [{"name": "x", "bucket": 3}]}})


def test_overrides_are_checked_like_the_file(repo):
    cfg = load_config(repo / "configs" / "kuairand_random.yaml", ["data.split.kind=temporal", "data.labels.skip_threshold=0.3"])
    assert cfg.data.split.kind == "temporal" and cfg.data.labels.skip_threshold == 0.3
    with pytest.raises(ConfigError, match="did you mean 'skip_threshold'"):
        load_config(repo / "configs" / "kuairand_random.yaml", ["data.labels.skip_treshold=0.3"])


def test_every_shipped_config_loads(repo):
    for path in sorted((repo / "configs").glob("*.yaml")):
        assert load_config(path).name == path.stem
