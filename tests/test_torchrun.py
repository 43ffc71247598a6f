"""Real multi-process runs: torchrun with 2 gloo ranks on CPU."""

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EQUAL_METRICS, run_on_a_free_port, torchrun, write_study_config
from engagerec import checkpoint
from engagerec.runs import evaluate_run

pytestmark = pytest.mark.slow


def _torchrun(nproc, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_on_a_free_port(
        lambda: [*torchrun(nproc), "-m", "engagerec", *args], cwd=cwd, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _write_config(path, data_dir, **train):
    return write_study_config(path, data_dir, sharding={"*": ["table_wise"]}, **train)


def test_two_gloo_ranks_shard_tables_train_and_evaluate_like_one(study_data, tmp_path, capsys):
    """2 ranks train with a table on each; the checkpoint evaluates the same on 2 ranks and on 1,
    exports into one program, and the run goes on on 1 rank from its epoch end (the tables
    reshard; mid-epoch that is refused: the SIGTERM test below checks it)."""
    config = _write_config(tmp_path / "run.yaml", study_data)
    run = tmp_path / "run"
    _torchrun(2, "train", "--config", str(config), "--out", str(run), cwd=tmp_path)

    plan = json.loads((run / "plan.json").read_text())
    assert {tuple(t["ranks"]) for t in plan.values()} == {(0,), (1,)}  # tables placed on both ranks
    rows = [r for r in csv.DictReader(open(run / "log.csv")) if r["phase"] == "train"]
    assert float(rows[-1]["skip/loss"]) < float(rows[0]["skip/loss"])  # the loss fell
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["skip/auc"] > 0.7

    # the same checkpoint evaluated on 2 ranks and on 1 rank: the same metrics
    two = tmp_path / "two.json"
    _torchrun(2, "evaluate", "--run-dir", str(run), "--json-out", str(two), cwd=tmp_path)
    two, one = json.loads(two.read_text()), evaluate_run(run, "test")  # 1 rank: in this process
    assert one["rows"] == two["rows"] == results["test"]["rows"]
    for key in EQUAL_METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key  # float32 AUC sums
        assert two[key] == pytest.approx(results["test"][key], rel=1e-5, abs=1e-5), key

    # its tables, sharded over 2 ranks, gathered into one exported program: the same test metrics
    from engagerec.export import export_run

    exported = export_run(run, tmp_path / "export")["programs"]["fp32"]["test"]
    assert exported["rows"] == results["test"]["rows"]
    assert exported["watch_ratio/mse"] == pytest.approx(results["test"]["watch_ratio/mse"], rel=1e-5)
    assert exported["skip/auc"] == pytest.approx(results["test"]["skip/auc"], rel=1e-4)

    # one more epoch on 1 rank (this process): the epoch-end checkpoint reshards
    from engagerec.cli import main

    more = str(_write_config(tmp_path / "more.yaml", study_data, epochs=4))
    assert main(["train", "--config", more, "--out", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["world_size"] == 1 and len(resumed["history"]) == 4 and resumed["test"]["skip/auc"] > 0.7


def test_column_wise_and_data_parallel_tables_train_over_two_ranks_and_evaluate_like_one(
    study_data, tmp_path
):
    """Column-wise constraints give every rank half of a table's columns (the per-rank table memory
    halves); data-parallel ones give every rank the whole table, kept identical by all-reducing its
    gradients. The model trains, and resharded onto 1 rank (one copy of each table) it scores the
    validation split as the 2 ranks did at the epoch's end, each with its own replicas."""
    sharding = {"*": ["data_parallel"], "user_id": ["column_wise"]}
    config = write_study_config(tmp_path / "mixed.yaml", study_data, sharding=sharding, epochs=1)
    run = tmp_path / "run"
    _torchrun(2, "train", "--config", str(config), "--out", str(run), cwd=tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    kinds = {table: (t["sharding_type"], sorted(t["ranks"])) for table, t in plan.items()}
    replicated = ("t_content_id", "t_gender", "t_genres", "t_duration_bucket")
    assert kinds == {
        "t_user_id": ("column_wise", [0, 1]),
        **{t: ("data_parallel", [0, 1]) for t in replicated},
    }
    rows = [r for r in csv.DictReader(open(run / "log.csv")) if r["phase"] == "train"]
    assert float(rows[-1]["skip/loss"]) < float(rows[0]["skip/loss"])  # the loss fell
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["skip/auc"] > 0.65  # 14 steps of 2 ranks: learning, not learnt

    for split, on_two_ranks in (("val", results["history"][0]), ("test", results["test"])):
        on_one = evaluate_run(run, split)  # here, in one process
        for key in EQUAL_METRICS:  # replicas that drifted apart would score rank 1's rows otherwise
            assert on_one[key] == pytest.approx(on_two_ranks[key], rel=1e-5, abs=1e-5), (split, key)


# engagerec with FBGEMM's loop given to every table one feature reads (the study's tables are far
# below engagerec.embedding_backward.MIN_ROWS), and a worker thread slowed down, so that a lookup
# that did not wait for its backward would read the tables before their update
LOOP_FOR_SMALL_TABLES = """
import threading, time
import torch
import engagerec.embedding_backward as paths
from engagerec.cli import run

paths.MIN_ROWS = 1
backward = torch.autograd.backward

def slow_in_the_worker(*args, **kwargs):
    if threading.current_thread().name.startswith("engagerec-embedding-backward"):
        time.sleep(0.01)
    return backward(*args, **kwargs)

torch.autograd.backward = slow_in_the_worker
run()
"""


def test_the_loop_on_a_worker_thread_trains_over_two_ranks_as_on_the_main_thread(study_data, tmp_path):
    """train.embedding_backward: loop (empty companion features, in every rank's batches) over 2
    ranks trains as the kernel does; with train.embedding_backward_thread: worker (the fused
    tables' backward beside the step, the collectives on the main thread) exactly as without."""
    script = tmp_path / "loop_for_small_tables.py"
    script.write_text(LOOP_FOR_SMALL_TABLES)
    found = {}
    for path, thread in (("kernel", "main"), ("loop", "main"), ("loop", "worker")):
        name = f"{path}_{thread}"
        config = _write_config(
            tmp_path / f"{name}.yaml",
            study_data,
            epochs=1,
            embedding_backward=path,
            embedding_backward_thread=thread,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        train = ["train", "--config", str(config), "--out", str(tmp_path / name)]
        done = run_on_a_free_port(
            lambda train=train: [*torchrun(2), str(script), *train], cwd=tmp_path, env=env, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        found[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert found[name]["world_size"] == 2
        assert (found[name]["embedding_backward"], found[name]["embedding_backward_thread"]) == (path, thread)
    plan = json.loads((tmp_path / "loop_worker" / "plan.json").read_text())
    assert {tuple(t["ranks"]) for t in plan.values()} == {(0,), (1,)}  # each rank backs its own tables
    assert found["loop_worker"]["history"] == found["loop_main"]["history"]  # exactly
    assert found["loop_worker"]["test"] == found["loop_main"]["test"]
    for key in EQUAL_METRICS:
        for split in ("val", "test"):
            kernel = found["kernel_main"]["history"][-1] if split == "val" else found["kernel_main"]["test"]
            loop = found["loop_main"]["history"][-1] if split == "val" else found["loop_main"]["test"]
            assert loop[key] == pytest.approx(kernel[key], rel=1e-5, abs=1e-5), (split, key)


def _ranks(launcher_pid):
    """rank -> pid of the processes a torchrun launcher started (each in a session of its own)."""
    out = {}
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        for variable in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if variable.startswith(b"RANK="):
                out[int(variable[5:])] = int(pid)
    return out


def _finish(job, timeout=120):
    """(stdout, stderr) of a torchrun launch; one still running after ``timeout`` seconds (a rank
    left waiting in a collective) is killed with its ranks, and fails the test."""
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_ranks(job.pid).values(), job.pid]:
            os.kill(pid, signal.SIGKILL)
        out, err = job.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-2000:]}") from None


def _exit_statuses(stderr):
    """What torchrun reports when ranks exit with another status than 0: the first one's status
    (its "root cause") and each rank's. torchrun stops the ranks still running when the first
    exits, with SIGTERM (-15): here ranks that had written everything and were tearing down."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)", stderr)
    root = re.search(r"Root Cause.*?exitcode\s*: (-?\d+)", stderr, re.S)
    return int(root.group(1)) if root else None, {int(rank): int(code) for rank, code in found}


# a rank 1 that reports a NaN loss at its 5th step of this launch, the rest of engagerec unchanged
NAN_ON_RANK_1 = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import engagerec.train as training
from engagerec.cli import run
from nan_injection import pipeline_with_nan_at

if os.environ["RANK"] == "1":
    training.TrainPipelineSparseDist = pipeline_with_nan_at(5)
run()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_sigterm_to_one_rank_stops_every_rank_after_one_step_and_a_nan_on_one_rank_stops_both(
    study_data, tmp_path, capsys
):
    """SIGTERM reaches rank 1 only: both ranks agree at the next log step, write one checkpoint and
    exit 75. The run resumes from it; then a NaN loss on rank 1 only stops both ranks at that step,
    rank 0 saying it was on another rank."""
    config = str(_write_config(tmp_path / "run.yaml", study_data, epochs=50, log_every_steps=5))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["train", "--config", config, "--out", str(run)]
    job = subprocess.Popen(
        [*torchrun(2), "-m", "engagerec", *train], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run / "log.csv").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)  # training has logged its first steps
    os.kill(_ranks(job.pid)[1], signal.SIGTERM)
    out, err = _finish(job)  # a rank that stopped alone would leave the other waiting
    stopped = re.search(r"stopped by SIGTERM after step (\d+); its checkpoint is in", out)
    assert stopped, out[-2000:] + err[-2000:]
    step = int(stopped.group(1))
    assert step % 5 == 0 and "(exit status 75)" in out  # at a log step, as every rank checks there
    # the ranks exit 75; torchrun lists that as a failure and exits 1 itself
    first, each = _exit_statuses(err)
    assert job.returncode == 1 and first == 75 and set(each.values()) <= {75, -15}, err[-3000:]
    last = checkpoint.latest(run / "checkpoints")
    assert last.name == f"step-{step}" and {"rank0.pt", "rank1.pt"} <= {p.name for p in last.iterdir()}
    assert json.loads((run / "results.json").read_text())["preempted"] is True
    # stopped mid-epoch on 2 ranks: resuming on 1 (this process) is refused, naming why
    from engagerec.cli import main

    written = (run / "config.json").read_text()
    assert main(train) == 2
    refused = capsys.readouterr().err
    assert re.search(
        r"stopped mid-epoch \(batch \d+ of epoch \d+, [\d,]+ samples\) on 2 rank\(s\); on 1 rank\(s\)",
        refused,
    )
    assert checkpoint.latest(run / "checkpoints") == last and (run / "config.json").read_text() == written

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    resumed = subprocess.Popen(
        [*torchrun(2), str(script), *train], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = _finish(resumed)
    assert f"resumed from {last} " in out, out[-2000:] + err[-2000:]
    nan_step = step + 5  # rank 1's 5th step since the resume: a log step, where ranks agree
    good = checkpoint.latest(run / "checkpoints")  # the preemption's, or an epoch end's since
    assert step <= int(good.name.split("-")[1]) < nan_step
    then = f"; training stopped. The last good checkpoint is {good}"
    assert f"error: step {nan_step}: non-finite loss (skip=nan){then}" in err, err[-3000:]  # rank 1
    assert f"error: step {nan_step}: non-finite loss (on another rank){then}" in err  # rank 0
    first, each = _exit_statuses(err)
    assert resumed.returncode == 1 and first == 2 and set(each.values()) <= {2, -15}, err[-3000:]
