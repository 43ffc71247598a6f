"""train.embedding_backward_thread: the fused tables' backward on a worker thread, beside the rest
of the step. It must be the same training, bit for bit: every lookup waits for the last update."""

import dataclasses
import shutil
import threading
import time

import pytest
import torch

import engagerec.embedding_backward
from conftest import study_run_config
from engagerec.backward_overlap import SETTINGS, EmbeddingBackwardOverlap, uses_worker
from engagerec.embedding_backward import bag_offsets, fbgemm_table
from engagerec.runs import open_run
from engagerec.train import train


@pytest.mark.parametrize("path,schedule", [("kernel", "constant"), ("loop", "constant"), ("loop", "linear")])
def test_the_worker_thread_trains_bit_for_bit_as_the_main_thread(
    study_data, tmp_path, monkeypatch, path, schedule
):
    """FBGEMM's kernel or its loop (what auto moves to the worker) on the worker thread: every
    weight of a step checkpoint taken mid-epoch and of the epoch's end, and every metric, equal."""
    monkeypatch.setattr(engagerec.embedding_backward, "MIN_ROWS", 1)  # the study's tables are small
    passes = []
    close = EmbeddingBackwardOverlap.close

    def counted_close(self):  # what the worker did, read as the trainer finishes with it
        passes.append((len(self.lookups), self.backward_passes))
        close(self)

    monkeypatch.setattr(EmbeddingBackwardOverlap, "close", counted_close)
    backward = torch.autograd.backward

    # the study's small tables update in microseconds: slowed down, a lookup or a checkpoint that
    # did not wait for the worker would read the weights before their update
    def slow_in_the_worker(*args, **kwargs):
        if threading.current_thread().name.startswith("engagerec-embedding-backward"):
            time.sleep(0.1)
        return backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", slow_in_the_worker)
    # a linear schedule changes the sparse rate every step, while the worker may still run the
    # last step's backward (see the next test)
    extra = {"lr_final": 0.1} if schedule == "linear" else {}
    # a step checkpoint every 10 steps: the newest is taken mid-epoch, right after a step
    cfg = study_run_config(
        study_data,
        epochs=1,
        lr_schedule=schedule,
        embedding_backward=path,
        checkpoint_every_steps=10,
        **extra,
    )
    runs, weights = {}, {}
    threads = torch.get_num_threads()
    for thread in ("main", "worker"):
        changed = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, embedding_backward_thread=thread)
        )
        runs[thread] = train(changed, tmp_path / thread)
        assert torch.get_num_threads() == threads  # the core lent to the worker came back
        assert (runs[thread]["embedding_backward"], runs[thread]["embedding_backward_thread"]) == (
            path,
            thread,
        )
        # the epoch's end also writes a step checkpoint: without it, "latest" is the one mid-epoch
        step_checkpoints = sorted(
            (tmp_path / thread / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])
        )
        assert [p.name for p in step_checkpoints] == ["step-20", f"step-{runs[thread]['steps']}"]
        shutil.rmtree(step_checkpoints[-1])
        for checkpoint in ("latest", "best"):
            with open_run(tmp_path / thread, checkpoint, device="cpu") as run:
                weights[thread, checkpoint] = {k: _local(v).clone() for k, v in run.dmp.state_dict().items()}
    [(lookups, backward_passes)] = set(passes)  # only the worker run built one (closed twice: safe)
    assert lookups >= 1 and backward_passes == runs["worker"]["steps"]
    assert runs["worker"]["history"] == runs["main"]["history"]  # every validation metric, exactly
    assert runs["worker"]["test"] == runs["main"]["test"]
    for checkpoint in ("latest", "best"):
        found, expected = weights["worker", checkpoint], weights["main", checkpoint]
        assert found.keys() == expected.keys() and any("embedding_bags" in name for name in expected)
        for name, tensor in expected.items():
            assert torch.equal(found[name], tensor), (checkpoint, name)
    tables = [name for name in weights["main", "best"] if "embedding_bags" in name]
    assert any(
        not torch.equal(weights["main", "latest"][t], weights["main", "best"][t]) for t in tables
    )  # apart


@pytest.mark.parametrize("loop", [False, True])
def test_fbgemms_cpu_backward_applies_the_rate_its_forward_read(loop):
    """What lets the main thread pass the next step's rate on while the worker runs the last
    backward (engagerec.backward_overlap): an FBGEMM that read it in backward would fail here."""
    updates = {}
    for when in ("before forward", "after forward"):
        table = fbgemm_table(100, 4, loop=loop, learning_rate=0.01)
        before = table.split_embedding_weights()[0].clone()
        if when == "before forward":
            table.set_learning_rate(0.0)
            pooled = table(torch.tensor([1, 2, 3, 4]), bag_offsets(2, 2, loop=loop))
        else:
            pooled = table(torch.tensor([1, 2, 3, 4]), bag_offsets(2, 2, loop=loop))
            table.set_learning_rate(0.0)
        pooled.sum().backward()
        updates[when] = (table.split_embedding_weights()[0] != before).any(dim=1).sum().item()
    assert updates == {"before forward": 0, "after forward": 4}


def _local(value):
    """A state-dict value as a plain tensor (one process: a sharded table's one shard)."""
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def test_the_setting_picks_the_worker_on_cpu_with_the_loop_and_two_threads(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert uses_worker("auto", cpu, loop_path=True) and not uses_worker("auto", cpu, loop_path=False)
    assert uses_worker("worker", cpu, loop_path=False) and not uses_worker("main", cpu, loop_path=True)
    assert not uses_worker("worker", cuda, loop_path=True)  # CUDA's backward is asynchronous already
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not uses_worker("auto", cpu, loop_path=True)  # one thread (torchrun's ranks): nothing beside it
    with pytest.raises(ValueError, match="embedding_backward_thread"):
        uses_worker("both", cpu, loop_path=True)
    assert SETTINGS == ("auto", "main", "worker")


def test_an_error_in_the_worker_reaches_the_main_thread():
    table = torch.nn.EmbeddingBag(10, 4, mode="sum")
    overlap = EmbeddingBackwardOverlap(table)
    failed = overlap._executor.submit(lambda: 1 / 0)
    overlap._pending.append(failed)
    with pytest.raises(ZeroDivisionError):
        overlap.wait()
    assert overlap.pending == 0
    overlap.close()
