import dataclasses

import pytest

from engagerec.config import config_changes, config_from_dict, load_config
from engagerec.errors import ConfigError


def test_unknown_key_suggests_nearest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.split.test_fracton'; did you mean 'test_fraction'"
    ):
        config_from_dict({"data": {"split": {"test_fracton": 0.2}}})


def test_wrong_type_names_the_path():
    with pytest.raises(ConfigError, match=r"data.filters.min_user_views: expected an integer"):
        config_from_dict({"data": {"filters": {"min_user_views": "ten"}}})


def test_a_float_in_exponent_form_without_a_dot_is_a_float(repo):
    """PyYAML follows YAML 1.1, which reads 1e-3 as a string (it wants 1.0e-3); a float key takes it
    as the number a user meant, in the file and in --set, and still refuses other strings."""
    config = repo / "configs" / "kuairand_random.yaml"
    cfg = load_config(config, ["train.dense_lr=1e-3", "train.sparse_lr=5E-2", "train.embedding_l2=1.5e1"])
    assert (cfg.train.dense_lr, cfg.train.sparse_lr, cfg.train.embedding_l2) == (0.001, 0.05, 15.0)
    assert config_from_dict({"train": {"lr_schedule": "linear", "lr_final": "+5e-1"}}).train.lr_final == 0.5
    with pytest.raises(ConfigError, match=r"train.dense_lr: expected float, got '1e-3x'"):
        load_config(config, ["train.dense_lr=1e-3x"])
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got '1e3'"):
        config_from_dict({"train": {"epochs": "1e3"}})


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
        assert cfg.name == path.stem or path.stem == "kuairand_mmoe"  # kuairand_random with its tower named
    assert load_config(repo / "configs" / "kuairand_mmoe.yaml") == load_config(
        repo / "configs" / "kuairand_random.yaml"
    )


def _write(directory, files):
    """Write {file name: YAML text} into ``directory``; returns it."""
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


BASE = """
name: base
data:
  features:
    - {name: a, kind: numeric, transform: log1p}
    - {name: b}
    - {name: c, kind: history, of: content_id, length: 20}
  labels:
    - {name: watch_ratio}
    - {name: skip, kind: binary, threshold: 0.5}
  split: {kind: random, test_fraction: 0.3}
model:
  tower: {name: mmoe, params: {num_experts: 4, expert_sizes: [64]}}
train: {epochs: 5, batch_size: 256}
"""


def test_a_derived_config_merges_named_entries_by_name(tmp_path):
    _write(tmp_path, {"base.yaml": BASE, "derived.yaml": """
base: base.yaml
name: derived
data:
  features:
    - {name: c, positions: true}      # updates c where it stands, its other keys kept
    - {name: a, buckets: 8}           # order in the derived list does not matter for updates
    - {name: d, kind: numeric}        # a new name is appended
    - {name: b, drop: true}           # removed
  labels:
    - {name: like, kind: binary, column: label}
  split: {kind: temporal}
model:
  tower: {params: {expert_sizes: [32]}}   # plain lists replace
train: {epochs: 1}
"""})  # fmt: skip
    cfg = load_config(tmp_path / "derived.yaml")
    assert [f.name for f in cfg.data.features] == ["a", "c", "d"]
    a, c, d = cfg.data.features
    assert (a.kind, a.transform, a.buckets) == ("numeric", "log1p", 8)
    assert (c.kind, c.of, c.length, c.positions) == ("history", "content_id", 20, True)
    assert d.kind == "numeric"
    assert [(label.name, label.kind) for label in cfg.data.labels] == [
        ("watch_ratio", "regression"), ("skip", "binary"), ("like", "binary")
    ]  # fmt: skip
    assert (cfg.data.split.kind, cfg.data.split.test_fraction) == ("temporal", 0.3)
    assert cfg.model.tower.params == {"num_experts": 4, "expert_sizes": [32]}
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("derived", 1, 256)


def test_merging_chains_through_bases_and_replace_takes_a_list_whole(tmp_path):
    _write(tmp_path, {"base.yaml": BASE, "middle.yaml": """
base: base.yaml
data:
  features: [{name: a, buckets: 4}, {name: e}]
""", "top.yaml": """
base: middle.yaml
replace: [data.features, model.tower]
data:
  features: [{name: e}, {name: a}]
model:
  tower: {name: ple}
"""})  # fmt: skip
    middle = load_config(tmp_path / "middle.yaml")
    assert [(f.name, f.buckets) for f in middle.data.features] == [("a", 4), ("b", 0), ("c", 0), ("e", 0)]
    top = load_config(tmp_path / "top.yaml")
    assert [(f.name, f.kind, f.buckets) for f in top.data.features] == [
        ("e", "categorical", 0), ("a", "categorical", 0)
    ]  # fmt: skip
    assert (top.model.tower.name, top.model.tower.params) == ("ple", {})  # not merged with mmoe's params
    assert top.train.epochs == 5  # what replace does not name still merges


MISTAKES = {  # a derived file's text -> the error it gets
    "data: {features: [{name: bb, drop: true}]}": r"drops 'bb', which the base .*did you mean 'b'",
    "data: {features: [{name: b, drop: true, kind: f}]}": r"drop entry is exactly \{name: b, drop: true",
    "data: {features: [{name: d}, {name: d}]}": r"data.features: 'd' is listed twice",
    "data: {features: []}": r"an empty list changes none of the base's named entries.*replace",
    "replace: [data.labels]\ndata: {split: {seed: 1}}": r"'data.labels', which this file does not set",
    # an updated entry is still checked key by key, with the nearest valid key named
    "data: {features: [{name: c, positons: 1}]}": r"features\[2\].positons'; did you mean 'positions'",
}


@pytest.mark.parametrize("derived", MISTAKES)
def test_merge_mistakes_are_errors_that_say_what_to_write(tmp_path, derived):
    _write(tmp_path, {"base.yaml": BASE, "derived.yaml": f"base: base.yaml\n{derived}\n"})
    with pytest.raises(ConfigError, match=MISTAKES[derived]) as err:
        load_config(tmp_path / "derived.yaml")
    assert "derived.yaml" in str(err.value)  # the file to fix is named


def test_a_file_without_a_base_keeps_its_lists_as_written(tmp_path):
    _write(tmp_path, {"plain.yaml": "data: {features: [{name: a}, {name: b}]}\nreplace: [data.features]\n"})
    with pytest.raises(ConfigError, match="no base"):
        load_config(tmp_path / "plain.yaml")
    _write(tmp_path, {"plain.yaml": "data: {features: [{name: b}, {name: a}]}\n"})
    assert [f.name for f in load_config(tmp_path / "plain.yaml").data.features] == ["b", "a"]


def test_overrides_address_list_entries_by_name(tmp_path):
    _write(tmp_path, {"base.yaml": BASE})
    cfg = load_config(
        tmp_path / "base.yaml", ["data.features.c.positions=true", "data.labels.skip.threshold=0.3"]
    )
    assert cfg.data.features[2].positions and cfg.data.labels[1].threshold == 0.3
    with pytest.raises(ConfigError, match=r"no entry of the 3-item list is named 'cc'; did you mean 'c'"):
        load_config(tmp_path / "base.yaml", ["data.features.cc.positions=true"])


def test_a_key_added_since_a_checkpoint_is_not_a_config_change():
    from engagerec.config import normalised_config

    cfg = load_config("kuairand_random")
    saved = dataclasses.asdict(cfg)
    for feature in saved["data"]["features"]:  # as a release before these keys wrote it
        for key in ("smoothing", "folds", "scheme"):
            feature.pop(key)
    assert config_changes(saved, dataclasses.asdict(cfg))  # raw, every feature differs
    assert config_changes(normalised_config(saved), dataclasses.asdict(cfg)) == []
