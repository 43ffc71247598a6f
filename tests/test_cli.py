"""The CLI is a thin wrapper: prepare prints the summary, synthesize writes readable data."""

import json

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


def test_synthesize_kuairand_shape_with_arrivals_and_refuses_them_without_the_shape(repo, tmp_path, capsys):
    out = tmp_path / "k"
    shape = ["synthesize", "--shape", "kuairand-1k", "--scale", "0.001", "--out", str(out)]
    assert main([*shape, "--video-arrival", "0.3", "--user-arrival", "0.5"]) == 0
    said = capsys.readouterr().out
    assert "of them uploaded during the log" in said and "50% of the users join during the log" in said
    floors = json.loads((out / "noise_floor.json").read_text())
    assert (floors["video_arrival"], floors["user_arrival"]) == (0.3, 0.5)
    config = ["synthesize", "--config", str(repo / "configs/synthetic_mmoe.yaml"), "--out", str(out)]
    assert main([*config, "--user-arrival", "0.5"]) == 2
    assert "--user-arrival shape the --shape kuairand-1k data only" in capsys.readouterr().err


def test_describe_counts_parameters_per_part(repo, kuairand_random, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    out, _, _ = kuairand_random
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


def test_gbdt_reference_keys_each_task_by_its_name_and_fits_the_iterations_given(kuairand_random):
    """A task named apart from its label lands in its own columns, with the iterations given for
    it (nothing chosen on validation). That the reference beats the constant baselines on the
    bundled data: tests/test_train.py::test_comparison_of_four_tasks_with_a_missing_label."""
    from engagerec_study.gbdt import gbdt_reference

    data, _, _ = kuairand_random
    tasks = [("watch_ratio", "watch_ratio", "regression"), ("ratio", "watch_ratio", "regression")]
    result = gbdt_reference(data, seed=0, tasks=tasks, iterations={"watch_ratio": 30, "ratio": 30})
    assert set(result) == {f"{task}/{metric}" for task in ("watch_ratio", "ratio")
                           for metric in ("mse", "mae", "xauc", "iterations")}  # fmt: skip
    assert result["ratio/iterations"] == 30 and result["ratio/mse"] == pytest.approx(
        result["watch_ratio/mse"]
    )


@pytest.mark.slow
def test_gbdt_reference_runs_on_the_studys_inputs_without_ids(repo, tmp_path, monkeypatch):
    from engagerec.config import load_config
    from engagerec.data.prepare import prepare
    from engagerec_study.gbdt import gbdt_reference

    monkeypatch.chdir(repo)
    summary = prepare(load_config("configs/paper_protocol.yaml").data, tmp_path)  # no id has many values
    # iterations given (choosing them on validation: tests/test_train.py's GBDT refit test)
    result = gbdt_reference(tmp_path, seed=0, iterations={"watch_ratio": 100, "skip": 100})
    assert result["watch_ratio/mse"] < summary["baselines_on_test"]["watch_ratio"]["mse_train_mean"]
    assert result["skip/auc"] > 0.6


def test_prepare_writes_where_train_reads(tmp_path):
    data = tmp_path / "elsewhere"
    small = ["--set", "data.source.synthetic.num_rows=2000", "--set", f"train.data_dir={data}"]
    assert main(["prepare", "--config", "synthetic_study", *small]) == 0
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


def test_the_program_exits_with_mains_status_and_a_torchrun_rank_runs_its_exit_handlers(tmp_path):
    """``engagerec`` (``cli.run``): main's status is the process's, alone or as one of torchrun's
    ranks (which skips the interpreter's teardown, but not the exit handlers or the output)."""
    import os
    import subprocess
    import sys

    program = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('exit handlers ran'))\n"
        "from engagerec.cli import run\n"
        "sys.argv = ['engagerec', 'evaluate', '--run-dir', sys.argv[1]]\n"
        "run()\n"
    )
    for world in ("1", "2"):
        env = {**os.environ, "WORLD_SIZE": world}
        done = subprocess.run(
            [sys.executable, "-c", program, str(tmp_path / "nowhere")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 2, (world, done.stderr[-2000:])
        assert "has no config.json" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout.strip() == "exit handlers ran"


def _study_config(tmp_path, data, tower=None):
    from conftest import write_study_config

    path = tmp_path / f"study{len(list(tmp_path.glob('study*.yaml')))}.yaml"
    return str(write_study_config(path, data, tower=tower, epochs=1))


@pytest.mark.slow
def test_refit_prepares_its_data_once_and_trains_the_chosen_epochs(tmp_path, capsys, monkeypatch):
    import json

    from conftest import write_study_config

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


def _installed(site, name, commands, modules=None):
    """A distribution ``name`` installed (its metadata) in ``site`` with ``commands`` as its
    ``engagerec.commands`` entry points, and the given modules beside it."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{command} = {target}\n" for command, target in commands.items())
    (info / "entry_points.txt").write_text(f"[engagerec.commands]\n{lines}")
    for module, code in (modules or {}).items():
        (site / f"{module}.py").write_text(code)


def test_commands_of_other_packages_come_from_entry_points(tmp_path, capsys, monkeypatch):
    """The study's commands and any package's: listed in --help and run with their arguments;
    one whose module cannot be imported is listed, and refused in one line when run."""
    greeting = (
        "from engagerec.cli import Command\n"
        "def _run(args):\n"
        "    print(f'hello {args.who}')\n"
        "    return 3\n"
        "hello = Command(help='greet someone', run=_run,\n"
        "                add_arguments=lambda parser: parser.add_argument('--who', required=True))\n"
    )
    _installed(
        tmp_path,
        "greeter",
        {
            "hello": "greeter_commands:hello",
            "broken": "no_such_module:command",
            "train": "greeter_commands:hello",
        },
        {"greeter_commands": greeting},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for command in ("compare", "refit", "results", "hello", "broken"):  # the study's and the others'
        assert f"    {command} " in listed
    assert "greet someone" in listed and "regenerate docs/RESULTS.md" in listed
    assert main(["hello", "--who", "TorchRec"]) == 3 and capsys.readouterr().out == "hello TorchRec\n"
    assert main(["broken", "--any", "args"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engagerec broken cannot be loaded (no_such_module:command" in err
    with pytest.raises(SystemExit):  # engagerec's own command keeps its name and arguments
        main(["train", "--who", "x"])
    assert "--config" in capsys.readouterr().err


BLOCKER = """import sys


class Blocked:
    '''Packages of the study extra, missing: an import of one fails as if not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocked())
"""


def test_a_study_command_without_the_study_extra_names_it_in_one_line(repo, tmp_path):
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    # scikit-learn and matplotlib missing (scipy stays: the library reads it too)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked={"sklearn", "matplotlib"}))
    env = {**os.environ, "PYTHONPATH": str(site)}

    def engagerec(*args):
        return subprocess.run([sys.executable, "-m", "engagerec", *args], capture_output=True, text=True,
                              cwd=repo, env=env)  # fmt: skip

    listed = engagerec("--help")
    assert listed.returncode == 0 and "    compare " in listed.stdout  # listed without the extra
    study_commands = (
        ["compare", "--config", "configs/kuairand_stats.yaml", "--gbdt"],
        ["refit", "--run-dir", str(tmp_path / "run")],
        ["results", "--sections", "random"],
    )
    for command in study_commands:
        done = engagerec(*command)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            f"engagerec {command[0]}: error: engagerec {command[0]} needs the study extra "
            "(sklearn is not installed): pip install 'engagerec[study]'\n"
        )
    # the library's commands do not need the extra
    made = engagerec(
        "synthesize", "--shape", "kuairand-1k", "--scale", "0.0005", "--out", str(tmp_path / "k")
    )
    assert made.returncode == 0 and "KuaiRand-1K-shaped" in made.stdout, made.stderr
