"""The KuaiRand-1K-shaped generator through the real kuairand adapter and the one writer, and
bad input deep in large files: a clear error, never a skipped row."""

import json

import pytest

from engagerec.config import load_config
from engagerec.data.errors import DataError
from engagerec.data.kuairand_generator import write_kuairand_1k
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader

SCALE = 0.002  # 23k rows, 8.7k videos: seconds, not minutes


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("kuairand_1k")
    write_kuairand_1k(out, scale=SCALE, seed=0)
    return out


def _config(repo, data, *overrides, name="kuairand_1k.yaml"):
    return load_config(
        repo / "configs" / name,
        [
            f"data.source.interactions={data}",
            f"data.source.users={data}/user_features_1k.csv",
            f"data.source.content={data}/video_features_basic_1k.csv",
            *overrides,
        ],
    )


def test_generated_files_prepare_unchanged_through_the_kuairand_adapter(repo, generated, tmp_path):
    floors = json.loads((generated / "noise_floor.json").read_text())
    summary = prepare(_config(repo, generated).data, tmp_path)
    assert summary["rows_read"] == floors["rows"] and summary["rows_kept"] == floors["rows"]
    assert summary["all"]["users"] == floors["users"]
    assert list(summary["all"]["labels"]) == ["watch_ratio", "skip", "long_view", "click"]
    # the shipped config's test split is the latest 20% of views
    assert summary["split"]["test"]["rows"] == round(summary["rows_kept"] * 0.2)
    # the planted signal is learnable: the noise floor lies below the constant baseline
    base = summary["baselines_on_test"]["watch_ratio"]["mse_train_mean"]
    assert floors["watch_ratio"]["mse"] < 0.8 * base
    reader = ShardReader(tmp_path, "train", batch_size=512)
    batch = next(iter(reader))
    assert batch.sparse_features["history"].lengths().max() == 20  # long histories, capped at 20
    assert set(batch.labels) == {"watch_ratio", "skip", "long_view", "click"}


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def test_a_corrupt_row_deep_in_a_large_log_is_an_error_with_its_line(repo, generated, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for file in generated.iterdir():
        (data / file.name).write_bytes(file.read_bytes())
    log = sorted(data.glob("log_*.csv"))[1]
    lines = _lines(log)
    row = len(lines) - 50  # near the end: far outside any sample a type sniffer reads
    header = lines[0].rstrip("\n").split(",")
    fields = lines[row + 1].rstrip("\n").split(",")
    fields[header.index("play_time_ms")] = "12x4"
    lines[row + 1] = ",".join(fields) + "\n"
    log.write_text("".join(lines))
    with pytest.raises(DataError) as caught:
        prepare(_config(repo, data).data, tmp_path / "out")
    message = str(caught.value)
    assert log.name in message and "play_time_ms" in message and f"row {row} (line {row + 2})" in message
    assert "12x4" in message and "a number" in message


def test_a_label_column_missing_from_one_log_file_is_an_error_naming_it(repo, generated, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for file in generated.iterdir():
        (data / file.name).write_bytes(file.read_bytes())
    log = sorted(data.glob("log_*.csv"))[1]
    lines = _lines(log)
    drop = lines[0].rstrip("\n").split(",").index("is_click")
    log.write_text(
        "".join(
            ",".join(f for i, f in enumerate(line.rstrip("\n").split(",")) if i != drop) + "\n"
            for line in lines
        )
    )
    with pytest.raises(DataError) as caught:
        prepare(_config(repo, data).data, tmp_path / "out")
    message = str(caught.value)
    assert log.name in message and "is_click" in message


def test_the_kuairand_1k_config_gives_the_history_a_table_of_its_own_and_the_dots_config_does_not(
    repo, generated, tmp_path
):
    """configs/kuairand_1k.yaml: the history reads a table of its own with the video vocabulary's
    rows, so FBGEMM sees one feature per table; kuairand_1k_dots.yaml (and the configs built on
    it), whose figures were measured so, keep the history in the video's table."""
    from engagerec.data.schema import DatasetSchema
    from engagerec.model_builder import build_model

    cfg = _config(repo, generated)
    prepare(cfg.data, tmp_path)
    schema = DatasetSchema.load(tmp_path)

    def tables(config_name):
        model = build_model(schema, _config(repo, generated, name=config_name).model)
        return {
            t.name: (list(t.feature_names), t.num_embeddings)
            for t in model.sparse_arch.embedding_bag_configs()
        }

    rows = schema.num_embeddings("content_id")
    own = tables("kuairand_1k.yaml")
    assert own["t_content_id"] == (["content_id"], rows) and own["t_content_id__history"] == (
        ["history"],
        rows,
    )
    assert tables("kuairand_1k_dots.yaml")["t_content_id"] == (["content_id", "history"], rows)


@pytest.mark.parametrize(
    "variant, config",
    [
        ("dot interactions, id embeddings 32 wide, sparse lr 0.1", "kuairand_1k_dots.yaml"),
        (
            "dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio, user, video and history detached",
            "kuairand_1k_factors.yaml",
        ),
    ],
)
def test_the_quality_levers_variants_the_make_targets_test_are_the_configs_they_stand_for(
    repo, variant, config
):
    """`make bench-quality` tests these configs beside the GBDT on runs benchmarks/quality_levers.py
    trained as its variants on kuairand_1k.yaml: each variant's model and training settings are
    its config's (quality_at_scale.py refuses runs of other settings)."""
    import dataclasses
    import sys

    sys.path.insert(0, str(repo / "benchmarks"))
    import quality_levers

    sets = ["train.data_dir=prepared/kuairand_1k", quality_levers.FLOAT32, quality_levers.SHARED_TABLE]
    sets += quality_levers.VARIANTS[variant]  # as quality_levers.validation trains it (the seed aside)
    trained = load_config(repo / "configs" / "kuairand_1k.yaml", sets)
    standing_for = load_config(repo / "configs" / config)
    assert dataclasses.asdict(trained.model) == dataclasses.asdict(standing_for.model)
    assert dataclasses.asdict(trained.train) == dataclasses.asdict(standing_for.train)


def _without_timings(schema: dict) -> dict:
    schema["meta"]["summary"].pop("seconds")
    return schema


def test_two_preparations_of_the_same_files_are_the_same_bytes(repo, tmp_path):
    """Float sums (normalisation, label statistics, target means, their running sums) are exact
    on a grid (engagerec.data.exact_sums): with DuckDB's float sums, the rows' order, which
    follows parallel statements, changed their last bits from run to run, and so the shards'."""
    data = tmp_path / "data"
    write_kuairand_1k(data, scale=0.03, seed=1)  # 350k rows: several row groups for two threads
    manifests, schemas = [], []
    for run in range(2):
        out = tmp_path / f"run{run}"
        prepare(_config(repo, data, "data.threads=2").data, out)
        manifests.append(json.loads((out / "manifest.json").read_text())["files"])
        schemas.append(_without_timings(json.loads((out / "schema.json").read_text())))
    assert schemas[0] == schemas[1]
    for files in manifests:
        files.pop("schema.json")  # its stage timings differ
    assert manifests[0] == manifests[1] and any(name.startswith("train/") for name in manifests[0])
