"""Checkpoints hold tensors and plain data only: they load with weights_only=True."""

import os
import random

import numpy as np
import pytest
import torch

from engagerec import checkpoint
from engagerec.errors import CheckpointError


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # numpy now holds a cached Gaussian: part of its state
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3).tolist())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.normal(), torch.rand(3).tolist()) == expected


class _Payload:
    """What a tampered checkpoint could run when unpickled: here it makes the directory ``marker``,
    so a test sees whether it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker, 0o777, True))  # exist_ok: the same each time it runs


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path):
    """Refused, and the pickled code never ran (not even while refusing)."""
    path = tmp_path / "step-1"
    path.mkdir()
    marker = tmp_path / "payload-ran"
    torch.save(
        {"rng": checkpoint.rng_state(), "progress": {"step": 1}, "evil": _Payload(marker)}, path / "rank0.pt"
    )
    assert not marker.exists()  # saving ran nothing
    model = torch.nn.Linear(2, 2)
    torch.distributed.checkpoint.save({"model": model.state_dict()}, checkpoint_id=str(path))
    checkpoint._write_manifest(path)  # a well-formed checkpoint whose contents were tampered with
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data"):
        checkpoint.load(path, model)
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data"):
        checkpoint.read_progress(path)  # what a resume reads first
    assert not marker.exists(), "the checkpoint's pickled code ran while it was being refused"
