"""The training job on real TorchRec parts: DMP, the planner, TrainPipelineSparseDist,
RecMetricModule, sharded checkpoints; one process here, two gloo ranks in test_torchrun.py."""

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import EQUAL_METRICS, study_run_config, synthetic_mmoe_config, write_study_config
from engagerec.config import TASK_METRICS, TaskConfig, apply_override, config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.errors import ConfigError
from engagerec.runs import evaluate_run, split_outputs
from engagerec.tasks import Task
from engagerec.train import train


def test_training_learns_and_reports_metrics_beside_baselines(study_data, tmp_path):
    results = train(study_run_config(study_data), tmp_path / "run")
    assert len(results["history"]) == 3
    test = results["test"]
    assert test["watch_ratio/mse"] < 0.8 * test["watch_ratio/baseline_mse_train_mean"]
    assert test["skip/accuracy"] > test["skip/baseline_accuracy_majority"] and test["skip/auc"] > 0.7
    assert test["watch_ratio/mse"] == pytest.approx(
        test["watch_ratio/mse_loss"], rel=1e-4
    )  # torchrec == ours
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["test"]["skip/auc"] == pytest.approx(
        test["skip/auc"]
    )
    import csv

    rows = list(csv.DictReader(open(run / "log.csv")))
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert {"train", "val", "test"} <= {r["phase"] for r in rows}
    assert float(train_rows[-1]["skip/loss"]) < float(train_rows[0]["skip/loss"])  # the training loss fell
    assert list(run.glob("events.out.tfevents.*"))
    plan = json.loads((run / "plan.json").read_text())
    assert set(plan) == {"t_user_id", "t_content_id", "t_gender", "t_genres", "t_duration_bucket"}
    assert len(list((run / "checkpoints").glob("best-step-*"))) == 1


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_metrics(study_data, tmp_path, capsys):
    """``engagerec train`` killed by SIGKILL between two step checkpoints (mid epoch 1, a best
    checkpoint behind it) resumes from the last one to the metrics of a run never interrupted."""
    every = 10
    cfg = study_run_config(study_data, epochs=2, checkpoint_every_steps=every)
    uninterrupted = train(cfg, tmp_path / "a")
    per_epoch = uninterrupted["steps"] // 2
    target = (per_epoch // every + 2) * every  # a step checkpoint well into epoch 1 (40 of 29..58)
    assert per_epoch + 1 < target and target + every < uninterrupted["steps"]
    run = tmp_path / "b"
    config = write_study_config(tmp_path / "b.yaml", study_data, epochs=2, checkpoint_every_steps=every)
    command = [sys.executable, "-m", "engagerec", "train", "--config", str(config), "--out", str(run)]
    with open(tmp_path / "killed.out", "w") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            if (run / "checkpoints" / f"step-{target}").exists():  # complete: renamed from .tmp- last
                job.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps[-1] == target and not (run / "results.json").exists()  # killed before the next one
    capsys.readouterr()
    resumed = train(cfg, run)
    assert f"(epoch 1, step {target})" in capsys.readouterr().out
    assert resumed["steps"] == uninterrupted["steps"]
    for key in EQUAL_METRICS:
        assert resumed["test"][key] == pytest.approx(uninterrupted["test"][key], rel=1e-5, abs=1e-6), key


def test_a_run_with_dropout_stopped_mid_epoch_resumes_to_the_metrics_of_one_never_stopped(
    study_data, tmp_path
):
    """Dropout draws from torch's global RNG, which a checkpoint saves and a resume restores; the
    resumed run's masks are the uninterrupted run's only if nothing else draws from it in
    between (the data loader once did, as its iterator started)."""
    cfg = study_run_config(study_data, epochs=1)
    tower = dataclasses.replace(cfg.model.tower, params={**cfg.model.tower.params, "dropout": 0.3})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tower=tower))
    uninterrupted = train(cfg, tmp_path / "a")
    stopped = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=uninterrupted["steps"] // 2)
    )
    assert "test" not in train(stopped, tmp_path / "b")  # mid-epoch: a step checkpoint, no test yet
    resumed = train(cfg, tmp_path / "b")
    for key in EQUAL_METRICS:
        assert resumed["test"][key] == pytest.approx(uninterrupted["test"][key], rel=1e-5, abs=1e-6), key


def test_a_bf16_tower_trains_through_the_pipeline_to_the_float32_runs_quality(study_data, tmp_path):
    """train.tower_precision=bf16 through DMP and TrainPipelineSparseDist (whose FX trace sees the
    autocast): it learns as the float32 run does, its numbers differ by bf16 rounding only, and a
    resume may not switch precision."""
    cfg = study_run_config(study_data, epochs=1)
    mixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tower_precision="bf16"))
    plain_run, bf16_run = train(cfg, tmp_path / "fp32"), train(mixed, tmp_path / "bf16")
    assert (plain_run["tower_precision"], bf16_run["tower_precision"]) == ("fp32", "bf16")
    plain, bf16 = plain_run["test"], bf16_run["test"]
    assert bf16["watch_ratio/mse"] != plain["watch_ratio/mse"]  # it did compute in bf16
    assert bf16["watch_ratio/mse"] == pytest.approx(plain["watch_ratio/mse"], rel=0.02)
    assert bf16["skip/auc"] == pytest.approx(plain["skip/auc"], abs=0.01) and bf16["skip/auc"] > 0.7
    with pytest.raises(ConfigError, match="tower_precision"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2)), tmp_path / "bf16")


def test_a_resume_compares_the_precision_auto_resolved_to(study_data, tmp_path, monkeypatch):
    """tower_precision auto on resume: refused where it resolves to another precision than the
    run trained in (another machine), and no change where it resolves to the same (fp32 -> auto
    on a CPU without native bf16)."""
    import engagerec.runs

    cfg = study_run_config(study_data, epochs=1)
    first = train(cfg, tmp_path / "run")  # fp32
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2, tower_precision="auto"))
    monkeypatch.setattr(engagerec.runs, "cpu_has_bf16_matmuls", lambda: True)
    with pytest.raises(ConfigError, match="tower_precision: trained in fp32, here bf16"):
        train(more, tmp_path / "run")
    monkeypatch.setattr(engagerec.runs, "cpu_has_bf16_matmuls", lambda: False)
    resumed = train(more, tmp_path / "run")
    assert resumed["tower_precision"] == "fp32" and resumed["steps"] == 2 * first["steps"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_cpu_multiplies_bf16_natively(monkeypatch, native):
    """tower_precision auto: bf16 on a CPU with AVX512-BF16 / AMX-BF16 (read from its flags),
    float32 on one without, where emulated bf16 would be slower; fp32 and bf16 are what they say."""
    import engagerec.runs
    from engagerec.machine import cpu_has_bf16_matmuls
    from engagerec.runs import tower_autocast

    cpuinfo = "flags\t\t: fpu avx2 avx512f" + (" avx512_bf16" if native else "") + "\n"
    monkeypatch.setattr(engagerec.runs, "cpu_has_bf16_matmuls", lambda: cpu_has_bf16_matmuls(cpuinfo))
    cpu = torch.device("cpu")
    assert tower_autocast("auto", cpu) == (torch.bfloat16 if native else None)
    assert (tower_autocast("bf16", cpu), tower_autocast("fp32", cpu)) == (torch.bfloat16, None)
    assert cpu_has_bf16_matmuls("flags\t\t: avx2 amx_tile amx_bf16\n")
    assert not cpu_has_bf16_matmuls("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # no flags line: fp32


def test_embedding_l2_shrinks_the_trained_rows_through_the_fused_optimiser(study_data, tmp_path):
    """train.embedding_l2 through DMP, the train pipeline and FBGEMM's fused row-wise Adagrad: the
    same run with the penalty ends with smaller id embeddings (every row starts equal, by seed) and
    still learns; a negative penalty is refused when the config loads."""
    from engagerec.config import load_config
    from engagerec.runs import open_run

    def norm(run):
        with open_run(run, "best", device="cpu") as opened:
            state = opened.dmp.module.state_dict()
            table = state["sparse_arch.embedding_bags.t_content_id.weight"].local_shards()[0].tensor
            return float(table.norm())

    plain = train(study_run_config(study_data, epochs=1), tmp_path / "plain")["test"]
    penalised = train(study_run_config(study_data, epochs=1, embedding_l2=0.1), tmp_path / "l2")["test"]
    assert norm(tmp_path / "l2") < 0.7 * norm(tmp_path / "plain")
    assert penalised["skip/auc"] > 0.6
    assert penalised["watch_ratio/mse"] < plain["watch_ratio/baseline_mse_train_mean"]
    with pytest.raises(ConfigError, match="train.embedding_l2 -0.5, expected 0 or more"):
        load_config("synthetic_study", ["train.embedding_l2=-0.5"])


def test_init_scale_sets_where_the_fused_tables_rows_start(study_data, tmp_path):
    """model.embeddings.init_scale reaches the rows DMP materialises in FBGEMM's fused kernel:
    after one step at a negligible sparse rate the scaled table's rows span about [-s, s],
    the other tables keep TorchRec's default [-1/sqrt(rows), 1/sqrt(rows)]; a scale of 0 or
    an unknown id space is refused when the spec is built."""
    import dataclasses

    from engagerec.data.schema import DatasetSchema
    from engagerec.features import FeatureSpec
    from engagerec.runs import open_run

    config = study_run_config(study_data, max_steps=1, sparse_lr=1e-9)
    embeddings = dataclasses.replace(config.model.embeddings, init_scale={"content_id": 0.5})
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, embeddings=embeddings))
    train(config, tmp_path / "run")
    with open_run(tmp_path / "run", "last", device="cpu") as opened:
        state = opened.dmp.module.state_dict()

    def table(name):
        return state[f"sparse_arch.embedding_bags.t_{name}.weight"].local_shards()[0].tensor

    content, user = table("content_id"), table("user_id")
    assert 0.45 < float(content.abs().max()) <= 0.5 + 1e-6
    assert float(user.abs().max()) <= user.shape[0] ** -0.5 + 1e-6
    schema = DatasetSchema.load(opened.data_dir)
    for bad, message in (
        ({"content_id": 0.0}, "init_scale.content_id: 0.0, expected a number > 0"),
        ({"nope": 0.1}, r"init_scale.nope: not an id space; id spaces: \['content_id', "),
    ):
        with pytest.raises(ConfigError, match=message):
            FeatureSpec.from_schema(schema, dataclasses.replace(embeddings, init_scale=bad))


def test_a_half_written_checkpoint_is_never_taken(study_data, tmp_path):
    run = tmp_path / "run"
    train(study_run_config(study_data, max_steps=10), run)
    checkpoints = run / "checkpoints"
    complete = sorted(p.name for p in checkpoints.iterdir())
    assert complete == ["step-10"]
    # a crash while writing step 20 leaves only a .tmp- directory with a partial shard
    shutil.copytree(checkpoints / "step-10", checkpoints / ".tmp-step-20")
    (checkpoints / ".tmp-step-20" / "rank0.pt").write_bytes(b"truncated")
    resumed = train(study_run_config(study_data, max_steps=15), run)
    assert resumed["steps"] == 15  # continued from step 10, not from the broken step 20


def test_no_resume_never_takes_an_older_runs_checkpoints(study_data, tmp_path):
    run = tmp_path / "run"
    train(study_run_config(study_data, epochs=1), run)
    # an older, longer run's best checkpoint with a higher step number
    older_best = next((run / "checkpoints").glob("best-step-*"))
    shutil.copytree(older_best, run / "checkpoints" / "best-step-100000")
    fresh = train(study_run_config(study_data, epochs=1), run, resume=False)
    assert fresh["steps"] == fresh["history"][-1]["step"] and len(fresh["history"]) == 1
    assert [p.name for p in (run / "checkpoints").glob("best-step-*")] == [f"best-step-{fresh['steps']}"]


def test_evaluate_run_reproduces_the_final_test_metrics(study_data, tmp_path):
    results = train(study_run_config(study_data, epochs=1), tmp_path / "run")
    again = evaluate_run(tmp_path / "run", "test")
    for key in EQUAL_METRICS:
        assert again[key] == pytest.approx(results["test"][key], rel=1e-6), key


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_other_loss_weightings_train(study_data, tmp_path, weighting):
    cfg = study_run_config(study_data, epochs=1)
    cfg.model.loss.weighting = weighting
    results = train(cfg, tmp_path / "run")
    import csv

    logged = [r for r in csv.DictReader(open(tmp_path / "run" / "log.csv")) if r["phase"] == "train"]
    assert float(logged[-1]["skip/loss_weight"]) != float(logged[0]["skip/loss_weight"])  # the weights moved
    assert results["test"]["skip/auc"] > 0.65
    assert results["test"]["watch_ratio/mse"] < results["test"]["watch_ratio/baseline_mse_train_mean"]


def _gradnorm_step(losses_of, first=None):
    """One GradNorm step (SGD on theta) for task losses ``losses_of(shared)`` of a fixed shared
    representation; L_t(first step) is ``first[t]`` times the current L_t (default: the current
    losses, i.e. equal training rates). Returns (weights after, theta's gradient,
    the gradient norms ||dL_t/dx||)."""
    import torch

    from engagerec.losses import GradNormWeighting

    torch.manual_seed(0)
    shared = torch.randn(8, 3, requires_grad=True)
    weighting = GradNormWeighting(num_tasks=2, alpha=1.5)
    losses = losses_of(shared)
    if first is not None:
        weighting.initial_losses.copy_(losses.detach() * torch.tensor(first))
    norms = [torch.autograd.grad(losses[t], shared, retain_graph=True)[0].norm() for t in range(2)]
    weighting(losses, shared).backward()
    grad = weighting.theta.grad.clone()
    torch.optim.SGD([weighting.theta], lr=0.1).step()
    return weighting.current_weights(), grad, torch.stack(norms)


def test_gradnorm_moves_weight_from_the_task_with_the_larger_gradient_to_the_slower_task():
    """GradNorm (Chen et al. 2018, eq. 2) minimises sum_t |w_t n_t - mean_t(w n) r_t^alpha| over w,
    with n_t = ||dL_t/dx|| and r_t = (L_t / L_t(0)) / mean ratio. Its gradient in w_t is
    sign(G_t - target_t) n_t, so a gradient step lowers the weight of a task whose weighted
    gradient norm is above its target and raises the others: at equal training rates (r = 1),
    weight moves away from the task with the larger gradient norm; at equal gradient norms,
    toward the task whose loss fell least (the slower one, r_t > 1)."""
    import torch

    # equal training rates (the first step: L(0) = L), task 1's gradient norm 9x task 0's
    weights, grad, norms = _gradnorm_step(lambda x: torch.stack([x.pow(2).mean(), (3 * x).pow(2).mean()]))
    assert norms[1] == pytest.approx(9 * float(norms[0]), rel=1e-5)
    assert weights[0] > 1 > weights[1] and float(weights.sum()) == pytest.approx(2.0)
    # w = 2 softmax(theta) at theta = 0: dw_0/dtheta = (1/2, -1/2), so d/dtheta_0 = -(n_0 + n_1) / 2
    total = float(norms.sum())
    assert grad.tolist() == pytest.approx([-total / 2, total / 2], rel=1e-5)
    # equal gradient norms; task 0's loss is at twice its first value, task 1's where it began
    same = lambda x: torch.stack([x.pow(2).mean()] * 2)  # noqa: E731
    assert _gradnorm_step(same)[0].tolist() == [1.0, 1.0]  # equal norms and rates: nothing to move
    weights, _, _ = _gradnorm_step(same, first=[0.5, 1.0])
    assert weights[0] > 1 > weights[1]


def test_uncertainty_weighting_learns_its_analytic_optimum():
    """For fixed task losses L_t, the objective sum_t (exp(-s_t) omega_t L_t + s_t) / 2 is least
    where its derivative in s_t, (1 - exp(-s_t) omega_t L_t) / 2, is 0: s_t = log(omega_t L_t),
    i.e. sigma_t^2 = omega_t L_t, and each loss's factor omega_t exp(-s_t) / 2 is 1 / (2 L_t)."""
    import math

    import torch

    from engagerec.losses import UncertaintyWeighting

    losses, omega = torch.tensor([0.25, 4.0, 1.0]), [1.0, 0.5, 2.0]
    weighting = UncertaintyWeighting(omega)
    optimiser = torch.optim.SGD(weighting.parameters(), lr=1.0)  # curvature 1/2 at the optimum
    for _ in range(200):
        optimiser.zero_grad()
        weighting(losses, shared=torch.zeros(0)).backward()
        optimiser.step()
    expected = [math.log(w * float(loss)) for w, loss in zip(omega, losses, strict=True)]
    assert weighting.log_variance.tolist() == pytest.approx(expected, abs=1e-5)
    assert weighting.current_weights().tolist() == pytest.approx((0.5 / losses).tolist(), rel=1e-5)


@pytest.mark.slow
def test_comparison_writes_table_json_and_plot_with_the_gbdt_reference(study_data, tmp_path):
    from engagerec_study.compare import run_comparison

    cfg = study_run_config(study_data, epochs=1)
    table = run_comparison(cfg, ["mmoe", "shared_bottom"], [0, 1], tmp_path, gbdt=True)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {
        "mmoe",
        "shared_bottom",
        "gbdt (scikit-learn)",
        "constant: train mean / majority class",
    }
    assert "±" in rows["mmoe"] and rows["mmoe"].rstrip("| ").endswith("2")  # two seeds, with spread
    summary = json.loads((tmp_path / "compare.json").read_text())["summary"]
    assert summary["mmoe"]["skip/auc"]["n"] == 2
    assert (
        summary["gbdt (scikit-learn)"]["watch_ratio/mse"]["mean"]
        < summary["mmoe"]["watch_ratio/baseline_mse_train_mean"]["mean"]
    )
    assert (tmp_path / "compare.png").stat().st_size > 1000 and (tmp_path / "compare.md").exists()
    assert "sharding plan" in (tmp_path / "mmoe" / "seed0" / "train.out").read_text()  # not on the console


def test_dense_only_data_trains_through_dmp(tmp_path):
    """configs/synthetic_mmoe.yaml: no embedding tables at all, two regression tasks."""
    cfg = synthetic_mmoe_config(
        tmp_path / "data",
        num_rows=12_000,
        input_dim=16,
        overrides=["train.epochs=6", "train.progress_bar=false"],
    )
    prepare(cfg.data, tmp_path / "data")
    results = train(cfg, tmp_path / "run")
    for task in ("y1", "y2"):
        assert results["test"][f"{task}/mse"] < 0.8 * results["test"][f"{task}/baseline_mse_train_mean"]


@pytest.mark.slow
def test_comparison_of_four_tasks_with_a_missing_label(repo, tmp_path, monkeypatch):
    """Any number of tasks end to end: the bundled KuaiRand log with four labels, one of them
    missing in some rows; every task gets its columns, its constant baseline and a GBDT model."""
    import numpy as np
    import pandas as pd

    from engagerec.config import load_config
    from engagerec.data.prepare import prepare
    from engagerec_study.compare import run_comparison

    log = pd.read_csv(repo / "datasets" / "kuairand" / "processed_standard_kcore_15.csv", sep="\t")
    log["label"] = log["label"].astype(float).where(np.arange(len(log)) % 5 != 0)  # 20% missing likes
    log.to_csv(tmp_path / "log.csv", sep="\t", index=False)
    monkeypatch.chdir(repo)
    cfg = load_config(
        "configs/kuairand_multitask.yaml",
        [
            f"data.source.interactions={tmp_path / 'log.csv'}",
            f"train.data_dir={tmp_path / 'data'}",
            "train.epochs=1",
            "train.batch_size=512",
        ],
    )
    summary = prepare(cfg.data, tmp_path / "data")
    assert summary["label_missing"]["like"] > 0.15 * summary["rows_kept"]
    table = run_comparison(cfg, ["mmoe"], [0], tmp_path / "compare", gbdt=True)
    header = table.splitlines()[0]
    for column in (
        "watch_ratio MSE",
        "watch_ratio XAUC",
        "skip AUC",
        "long_view AUC",
        "like AUC",
        "like accuracy",
    ):
        assert column in header
    rows = {line.split("|")[1].strip(): line.split("|")[2:-2] for line in table.splitlines()[2:]}
    assert "–" not in rows["mmoe"] and "–" not in rows["gbdt (scikit-learn)"]  # every task scored
    constant = dict(
        zip(
            [c.strip() for c in header.split("|")[2:-2]],
            [c.strip() for c in rows["constant: train mean / majority class"]],
            strict=True,
        )
    )
    like_rate = summary["split"]["test"]["labels"]["like"]["mean"]
    assert float(constant["like accuracy"]) == pytest.approx(max(like_rate, 1 - like_rate), abs=1e-4)
    results = json.loads((tmp_path / "compare" / "compare.json").read_text())
    mmoe = results["summary"]["mmoe"]
    assert mmoe["like/auc"]["mean"] > 0.6 and mmoe["long_view/auc"]["mean"] > 0.6
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 1000
    # the GBDT reference beats the constant baselines on the bundled data, on every task
    gbdt, constants = results["summary"]["gbdt (scikit-learn)"], summary["baselines_on_test"]
    assert gbdt["watch_ratio/mse"]["mean"] < 0.8 * constants["watch_ratio"]["mse_train_mean"]
    assert gbdt["skip/auc"]["mean"] > 0.75 and gbdt["long_view/auc"]["mean"] > 0.75
    assert gbdt["like/auc"]["mean"] > 0.6
    for task in ("skip", "long_view"):
        assert gbdt[f"{task}/accuracy"]["mean"] > constants[task]["accuracy_majority"], task


def test_training_metrics_sample_at_least_one_batch_per_log_line(study_data, tmp_path):
    for every in (0, 51):  # log_every_steps is 50 by default
        with pytest.raises(ConfigError, match="train_metrics_every_steps"):  # when the config loads
            study_run_config(study_data, epochs=1, train_metrics_every_steps=every)
        # a config built in code skips load_config: train() checks it before any step
        built = study_run_config(study_data, epochs=1)
        built = dataclasses.replace(
            built, train=dataclasses.replace(built.train, train_metrics_every_steps=every)
        )
        with pytest.raises(ConfigError, match="train_metrics_every_steps"):
            train(built, tmp_path / "run")


def test_evaluation_reports_exactly_the_metrics_a_monitor_may_name(kuairand_run):
    run, _ = kuairand_run
    results = json.loads((run / "results.json").read_text())
    kinds = {"watch_ratio": "regression", "skip": "binary"}
    named = {f"{task}/{metric}" for task, kind in kinds.items() for metric in TASK_METRICS[kind]}
    assert set(results["test"]) == named | {"loss", "rows"}  # config.TASK_METRICS follows evaluate


def test_a_monitor_evaluation_does_not_report_is_refused_before_any_training(study_data, tmp_path):
    with pytest.raises(ConfigError, match=r"'skip/aucc' is not a metric .*<binary task>/auc\|accuracy"):
        study_run_config(study_data, monitor="skip/aucc", monitor_mode="max")  # when the config loads
    with pytest.raises(ConfigError, match=r"'skip/auc' improves upward: set train.monitor_mode: max"):
        study_run_config(study_data, monitor="skip/auc")
    # a config that names no tasks gets one per label of the prepared data: checked once they are known
    run = tmp_path / "run"
    with pytest.raises(
        ConfigError, match=r"'click/auc' is not a metric .*expected loss or one of .*skip/auc"
    ):
        train(study_run_config(study_data, monitor="click/auc", monitor_mode="max"), run)
    assert not (run / "log.csv").exists() and not (run / "checkpoints").exists()
    # GAUC groups by a feature the model must embed: refused before training, not at the first validation
    with pytest.raises(ConfigError, match=r"train.gauc_group 'session', which is not a sparse feature"):
        train(
            study_run_config(study_data, monitor="skip/gauc", monitor_mode="max", gauc_group="session"), run
        )
    assert not (run / "log.csv").exists()


def test_enum_like_keys_are_checked_when_the_config_loads(study_data):
    raw = study_run_config(study_data)
    for key, value, where, expected in [
        ("model.loss.weighting", "uncertanity", "model.loss.weighting", "fixed, uncertainty, gradnorm"),
        ("data.split.kind", "time", "data.split.kind", "random, temporal, user"),
        ("data.features.5.transform", "log", "data.features[5].transform", "none, log1p"),
    ]:
        changed = dataclasses.asdict(raw)
        apply_override(changed, f"{key}={value}")
        with pytest.raises(
            ConfigError, match=f"{re.escape(where)}: expected one of {expected}, got '{value}'"
        ):
            config_from_dict(changed)


@pytest.fixture(scope="module")
def refit_data(tmp_path_factory):
    """The study data prepared again without validation rows: every non-test row trains."""
    out = tmp_path_factory.mktemp("study_small_refit")
    cfg = study_run_config(out)
    prepare(dataclasses.replace(cfg.data, split=dataclasses.replace(cfg.data.split, val_fraction=0.0)), out)
    return out


@pytest.mark.slow
def test_data_without_validation_rows_trains_every_epoch_and_keeps_the_last(study_data, refit_data, tmp_path):
    results = train(study_run_config(refit_data, epochs=3, patience=1), tmp_path / "run")
    # no validation: no early stopping (patience 1 would stop a validated run that got worse),
    # every epoch recorded without metrics, and the test metrics are the last epoch's model's
    assert [set(h) for h in results["history"]] == [{"epoch", "step"}] * 3
    assert results["best_epoch"] == 2 and results["val"] == results["history"][-1]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("best-step-*")] == [
        f"best-step-{results['steps']}"
    ]
    again = evaluate_run(tmp_path / "run", "test")
    assert again["skip/auc"] == pytest.approx(results["test"]["skip/auc"], rel=1e-6)
    with pytest.raises(DataError, match="split 'val' has no rows to evaluate"):  # not zeros
        evaluate_run(tmp_path / "run", "val")
    # the model to ship exports (its example input from the training rows) and serves the same
    from engagerec.export import export_run

    exported = export_run(tmp_path / "run", tmp_path / "export", check_rows=500)
    assert exported["programs"]["fp32"]["test"]["skip/auc"] > 0.7
    assert exported["max_abs_difference_fp32_vs_eager"] < 1e-4
    # stopped mid-run and resumed: the same epochs, the same last model
    stopped = train(study_run_config(refit_data, epochs=3, max_steps=50), tmp_path / "resumed")
    assert "test" not in stopped and stopped["steps"] == 50
    resumed = train(study_run_config(refit_data, epochs=3), tmp_path / "resumed")
    assert resumed["best_epoch"] == 2 and resumed["steps"] == results["steps"]
    assert resumed["test"]["skip/auc"] == pytest.approx(results["test"]["skip/auc"], rel=1e-6)
    # the same test rows as the data with validation rows, and more training rows
    with_val = json.loads((study_data / "schema.json").read_text())["meta"]["summary"]["split"]
    without = json.loads((refit_data / "schema.json").read_text())["meta"]["summary"]["split"]
    assert without["test"]["rows"] == with_val["test"]["rows"] and without["val"]["rows"] == 0
    assert without["train"]["rows"] == with_val["train"]["rows"] + with_val["val"]["rows"]


def test_data_without_test_rows_trains_and_reports_no_test_metrics(tmp_path):
    cfg = study_run_config(tmp_path / "data", epochs=1)
    prepare(
        dataclasses.replace(cfg.data, split=dataclasses.replace(cfg.data.split, test_fraction=0.0)),
        tmp_path / "data",
    )
    results = train(cfg, tmp_path / "run")
    assert "test" not in results and results["best_epoch"] == 0 and "skip/auc" in results["val"]
    assert "test" not in json.loads((tmp_path / "run" / "results.json").read_text())


@pytest.mark.slow
def test_a_refit_trains_the_chosen_runs_config_for_the_epochs_validation_chose(
    study_data, refit_data, tmp_path
):
    from engagerec.config import config_changes, with_tower
    from engagerec_study.refit import refit_run

    # a tower other than the config's, so that the refit must take the chosen run's own
    chosen_cfg = with_tower(study_run_config(study_data, epochs=4, patience=1), "ple", seed=3)
    chosen = train(chosen_cfg, tmp_path / "chosen")
    refit = refit_run(tmp_path / "chosen", refit_data, tmp_path / "refit")
    assert len(refit["history"]) == chosen["best_epoch"] + 1 and refit["seed"] == 3
    assert refit["tower"] == "ple" and refit["test"]["skip/auc"] > 0.7
    configs = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("chosen", "refit")]
    # nothing but the split's validation share differs (run length and paths are left out)
    assert config_changes(*configs) == ["data.split.val_fraction: 0.1 -> 0.0"]
    assert configs[1]["train"]["epochs"] == chosen["best_epoch"] + 1
    assert configs[1]["train"]["data_dir"] == str(refit_data)
    labels = split_outputs(tmp_path / "refit", "test").labels["skip"]
    assert (labels == split_outputs(tmp_path / "chosen", "test").labels["skip"]).all()
    assert "sharding plan" in (tmp_path / "refit" / "train.out").read_text()
    # refused: data with validation rows, data of another data config, a run that never finished
    with pytest.raises(ValueError, match="split.val_fraction 0"):
        refit_run(tmp_path / "chosen", study_data, tmp_path / "again")
    other = study_run_config(tmp_path / "other")
    split = dataclasses.replace(other.data.split, val_fraction=0.0, seed=7)
    prepare(dataclasses.replace(other.data, split=split), tmp_path / "other")
    with pytest.raises(ValueError, match="data.split.seed: 0 -> 7"):
        refit_run(tmp_path / "chosen", tmp_path / "other", tmp_path / "again")
    train(study_run_config(study_data, max_steps=2), tmp_path / "unfinished")
    with pytest.raises(ValueError, match="did not finish"):
        refit_run(tmp_path / "unfinished", refit_data, tmp_path / "again")


@pytest.mark.slow
def test_the_gbdt_refits_with_given_iterations_and_refuses_to_guess_them(study_data, refit_data):
    from engagerec_study.gbdt import gbdt_reference

    tasks = [("watch_ratio", "watch_ratio", "regression"), ("skip", "skip", "binary")]
    chosen = gbdt_reference(study_data, 0, tasks)
    iterations = {task: int(chosen[f"{task}/iterations"]) for task, _, _ in tasks}
    iterations["skip"] += 3  # distinct counts: each task must get its own
    refit = gbdt_reference(refit_data, 0, tasks, iterations)
    assert {task: refit[f"{task}/iterations"] for task, _, _ in tasks} == iterations
    assert refit["skip/auc"] > 0.7 and refit["watch_ratio/mse"] != chosen["watch_ratio/mse"]
    with pytest.raises(ValueError, match="no validation rows"):
        gbdt_reference(refit_data, 0, tasks)
    with pytest.raises(ValueError, match="no iteration count given for task 'skip'"):
        gbdt_reference(refit_data, 0, tasks, {"watch_ratio": 5})


def test_a_ratio_trained_with_cross_entropy_learns_and_reports_the_ratio(study_data, tmp_path):
    cfg = study_run_config(study_data, epochs=2)
    tasks = [{"name": "watch_ratio", "label": "watch_ratio", "loss": "cross_entropy"},
             {"name": "skip", "label": "skip", "kind": "binary"}]  # fmt: skip
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, tasks=[TaskConfig(**t) for t in tasks])
    )
    results = train(cfg, tmp_path / "run")
    test = results["test"]
    assert test["watch_ratio/mse"] < 0.8 * test["watch_ratio/baseline_mse_train_mean"]
    # the training loss logged is cross-entropy's (at least the labels' entropy, far above an MSE)
    import csv

    logged = [r for r in csv.DictReader(open(tmp_path / "run" / "log.csv")) if r["phase"] == "train"]
    assert float(logged[-1]["watch_ratio/loss"]) > 2 * test["watch_ratio/baseline_mse_train_mean"]
    outputs = split_outputs(tmp_path / "run", "test").predictions["watch_ratio"]
    assert 0.0 < outputs.min() and outputs.max() < 1.0  # sigmoid(logit), never the logit
    with pytest.raises(ConfigError, match="expected output 'sigmoid'"):
        Task(TaskConfig(name="watch_time", label="watch_time", output="identity", loss="cross_entropy"))
    with pytest.raises(ConfigError, match="loss 'mse' on a binary task"):
        Task(TaskConfig(name="skip", label="skip", kind="binary", loss="mse"))
    # a ratio whose training values leave [0, 1] (kept over a cap) has no cross-entropy minimum
    from engagerec.data.schema import DatasetSchema
    from engagerec.model_builder import build_model

    schema = DatasetSchema.load(study_data)
    schema.meta["summary"]["split"]["train"]["labels"]["watch_ratio"]["max"] = 1.7
    with pytest.raises(ConfigError, match=r"training values lie in \[0.\d+, 1.7\], expected \[0, 1\]"):
        build_model(schema, cfg.model)


def test_the_gbdt_fits_on_a_seeded_sample_of_the_training_rows_when_asked(study_data):
    """At millions of rows the GBDT may fit on a sample: the same rows for the same seed,
    other rows for another, and all of them when the sample would be as large."""
    from engagerec.data.schema import DatasetSchema
    from engagerec_study.gbdt import gbdt_reference

    tasks, iterations = [("watch_ratio", "watch_ratio", "regression")], {"watch_ratio": 20}
    rows = DatasetSchema.load(study_data).meta["splits"]["train"]["rows"]
    whole = gbdt_reference(study_data, 0, tasks, iterations)
    sample = gbdt_reference(study_data, 0, tasks, iterations, train_rows=rows // 4)
    assert "train_rows" not in whole and sample["train_rows"] == rows // 4
    assert sample == gbdt_reference(study_data, 0, tasks, iterations, train_rows=rows // 4)
    assert sample["watch_ratio/mse"] != whole["watch_ratio/mse"]
    other = gbdt_reference(study_data, 1, tasks, iterations, train_rows=rows // 4)
    assert other["watch_ratio/mse"] != sample["watch_ratio/mse"]
    everything = gbdt_reference(study_data, 0, tasks, iterations, train_rows=rows * 2)
    assert everything["train_rows"] == rows and everything["watch_ratio/mse"] == whole["watch_ratio/mse"]
