"""The CLI is a thin wrapper: prepare prints the summary, synthesize writes readable data."""

import pytest

from engagerec.cli import main
from engagerec.data.reader import ShardReader


def test_prepare_prints_the_summary(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    out = tmp_path / "k"
    assert (
        main(
            [
                "prepare",
                "--config",
                "configs/kuairand_temporal.yaml",
                "--out",
                str(out),
                "--set",
                "data.split.test_fraction=0.2",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for expected in (
        "rows read",
        "41,828",
        "dropped: zero or negative duration",
        "7,738",
        "label skip",
        "split temporal",
        "test accuracy of the majority class",
    ):
        assert expected in text
    assert ShardReader(out, "test").total_rows > 0


def test_synthesize_writes_source_tables_that_prepare_reads(repo, tmp_path, capsys):
    args = [
        "--config",
        str(repo / "configs/synthetic_mmoe.yaml"),
        "--set",
        "data.source.synthetic.num_rows=2000",
    ]
    assert main(["synthesize", *args, "--out", str(tmp_path / "raw")]) == 0
    assert "2,000 synthetic rows (mmoe)" in capsys.readouterr().out
    assert (tmp_path / "raw" / "interactions.parquet").is_file()
    assert main(["prepare", *args, "--out", str(tmp_path / "prepared")]) == 0
    reader = ShardReader(tmp_path / "prepared", "train")
    assert reader.schema.label_names == ["y1", "y2"] and len(reader.schema.dense) == 100


def test_synthesize_kuairand_shape(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["synthesize", "--shape", "kuairand-1k", "--scale", "0.0005", "--out", str(out)]) == 0
    assert "KuaiRand-1K-shaped" in capsys.readouterr().out
    assert {p.name for p in out.glob("*.csv")} == {
        "log_standard_4_08_to_4_21_1k.csv",
        "log_standard_4_22_to_5_08_1k.csv",
        "user_features_1k.csv",
        "video_features_basic_1k.csv",
    }


def test_describe_counts_parameters_per_part(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    out = tmp_path / "k"
    assert main(["prepare", "--config", "configs/kuairand_random.yaml", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "describe",
                "--config",
                "configs/kuairand_random.yaml",
                "--data",
                str(out),
                "--towers",
                "mmoe,single_task",
                "--set",
                "model.embeddings.dim=4",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:4]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    from engagerec.data.schema import DatasetSchema

    users = DatasetSchema.load(out).num_embeddings("user_id")
    assert rows["embeddings/t_user_id"][0].strip() == f"{users * 4:,}"
    assert rows["head/skip"][0].strip() == "65"  # 64-wide expert output -> 1 logit
    assert rows["tower"][0].strip() != rows["tower"][1].strip()


def test_gbdt_reference_beats_the_constant_baselines(repo, tmp_path, monkeypatch):
    from engagerec.config import load_config
    from engagerec.data.prepare import prepare
    from engagerec.gbdt import gbdt_reference

    monkeypatch.chdir(repo)
    summary = prepare(load_config("configs/kuairand_random.yaml").data, tmp_path)
    result = gbdt_reference(tmp_path, seed=0)
    baselines = summary["baselines_on_test"]
    assert result["watch_ratio/mse"] < 0.8 * baselines["watch_ratio"]["mse_train_mean"]
    assert result["skip/auc"] > 0.75
    assert result["skip/accuracy"] > baselines["skip"]["accuracy_majority"]
    # keyed by the towers' tasks: a task named apart from its label lands in its own columns
    renamed = gbdt_reference(tmp_path, seed=0, tasks=[("ratio", "watch_ratio", "regression")])
    assert set(renamed) == {"ratio/mse", "ratio/mae", "ratio/xauc", "ratio/iterations"}
    assert renamed["ratio/mse"] == pytest.approx(result["watch_ratio/mse"])


def test_gbdt_reference_runs_on_the_studys_inputs_without_ids(repo, tmp_path, monkeypatch):
    from engagerec.config import load_config
    from engagerec.data.prepare import prepare
    from engagerec.gbdt import gbdt_reference

    monkeypatch.chdir(repo)
    summary = prepare(load_config("configs/paper_protocol.yaml").data, tmp_path)  # no id has many values
    result = gbdt_reference(tmp_path, seed=0)
    assert result["watch_ratio/mse"] < summary["baselines_on_test"]["watch_ratio"]["mse_train_mean"]
    assert result["skip/auc"] > 0.6


def test_prepare_writes_where_train_reads(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(repo)
    data = tmp_path / "elsewhere"
    assert (
        main(["prepare", "--config", "configs/kuairand_temporal.yaml", "--set", f"train.data_dir={data}"])
        == 0
    )
    assert (data / "schema.json").is_file()  # train.data_dir, not prepared/<name>


def test_engagerec_errors_are_messages_and_anything_else_is_a_traceback(tmp_path, capsys, monkeypatch):
    import engagerec.train as training

    data = tmp_path / "data"
    assert main(["prepare", "--config", _study_config(tmp_path, data), "--out", str(data)]) == 0
    typo = _study_config(tmp_path, data, tower={"name": "mmoe", "params": {"num_expert": 3}})
    assert main(["train", "--config", typo, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "engagerec train: error: model.tower 'mmoe' with params {'num_expert': 3}:" in err
    assert "num_expert" in err and "Traceback" not in err
    assert main(["evaluate", "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "has no config.json" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise KeyError("a programming error")

    monkeypatch.setattr(training, "train_label_means", bug)
    with pytest.raises(KeyError, match="a programming error"):  # not reported as bad input
        main(["train", "--config", _study_config(tmp_path, data), "--out", str(tmp_path / "run2")])


def _study_config(tmp_path, data, tower=None):
    from test_train import write_study_config

    path = tmp_path / f"study{len(list(tmp_path.glob('study*.yaml')))}.yaml"
    return str(write_study_config(path, data, tower=tower, epochs=1))


def test_refit_prepares_its_data_once_and_trains_the_chosen_epochs(tmp_path, capsys, monkeypatch):
    import json

    from test_train import write_study_config

    config = write_study_config(tmp_path / "study.yaml", tmp_path / "data", epochs=3, patience=1)
    assert main(["prepare", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "chosen")]) == 0
    capsys.readouterr()
    refit = ["refit", "--run-dir", str(tmp_path / "chosen")]
    assert main(refit) == 0  # the defaults: data beside the run's data, the run beside the chosen
    text = capsys.readouterr().out
    chosen = json.loads((tmp_path / "chosen" / "results.json").read_text())
    splits = json.loads((tmp_path / "data_refit" / "schema.json").read_text())["meta"]["summary"]["split"]
    assert splits["val"]["rows"] == 0 and splits["test"]["rows"] > 0  # prepared now
    assert f"for {chosen['best_epoch'] + 1} epoch(s)" in text and "test: " in text
    assert json.loads((tmp_path / "chosen_refit" / "results.json").read_text())["test"]
    # a second refit finds its data prepared; --prepare-only stops there
    assert main([*refit, "--out", str(tmp_path / "again"), "--prepare-only"]) == 0
    assert "(already prepared)" in capsys.readouterr().out and not (tmp_path / "again").exists()
    # refused with a message, nothing overwritten: other prepared data (here the chosen run's
    # own, which has validation rows), the chosen run as the output, unprepared data under torchrun
    schema = (tmp_path / "data" / "schema.json").read_text()
    assert main([*refit, "--data-dir", str(tmp_path / "data")]) == 2
    assert "has validation rows" in capsys.readouterr().err
    assert (tmp_path / "data" / "schema.json").read_text() == schema
    assert main([*refit, "--out", str(tmp_path / "chosen")]) == 2
    assert "is the chosen run itself" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*refit, "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "under torchrun the refit's data must be prepared first" in capsys.readouterr().err
