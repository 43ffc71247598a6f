"""Sharded, atomic checkpoints: torch.distributed.checkpoint for the model and optimiser
(every rank writes its own shards), plus each rank's RNG state and the run's progress.

A checkpoint is written into ``.tmp-<name>/`` and renamed to ``<name>/`` by rank 0 only
after every rank has finished writing, so a directory without the ``.tmp-`` prefix is
always complete; a run killed mid-write leaves only a ``.tmp-`` directory, which is ignored.
A failed write (a full disk) removes its ``.tmp-`` directory and leaves the previous
checkpoints as they were.

Each checkpoint holds ``manifest.json``: every file's size and CRC-32, written last. Loading
checks it, so a damaged or truncated checkpoint is an error that names the file, and
``latest`` passes over such a checkpoint to the newest one that checks out.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from engagerec.data.manifest import crc32
from engagerec.disk import free_space, is_disk_full
from engagerec.distributed import any_rank, is_rank_zero, rank
from engagerec.errors import CheckpointError

MANIFEST = "manifest.json"
FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk
STEP_PATTERN = re.compile(r"^step-(\d+)$")
BEST_PATTERN = re.compile(r"^best-step-(\d+)$")


def rng_state() -> Dict[str, Any]:
    """This process's torch (CPU, and its current GPU's when CUDA is initialised), numpy and
    Python RNG states (saved per rank, for exact resume), as tensors and plain numbers only, so
    that a checkpoint loads with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    cuda = (
        {"cuda": torch.cuda.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else {}
    )
    return {
        **cuda,
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },  # fmt: skip
        "python": {
            "version": int(version),
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss_next": gauss_next,
        },  # fmt: skip
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the torch, numpy and Python RNG states that ``rng_state`` returned (the GPU's
    where the state has one and this process has a GPU: a CPU resume of a GPU run skips it)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():  # a CUDA run
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["words"].tolist()), python_state["gauss_next"])
    )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _last_line(error: BaseException) -> str:
    """The cause of ``error`` in one line (DCP's CheckpointException carries every rank's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() not in ("", ")")]
    return lines[-1] if lines else type(error).__name__


def save(
    root: Path,
    name: str,
    model: torch.nn.Module,
    optimizer: Any,
    progress: Dict[str, Any],
    keep: Optional[re.Pattern] = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``root/name`` atomically, its manifest last; then keep only the newest
    ``keep_last`` checkpoints whose names match ``keep``.

    Raises:
        CheckpointError: when writing fails (e.g. no space left); the partial write is removed
            and every earlier checkpoint is left as it was.
    """
    tmp, final = root / f".tmp-{name}", root / name
    if is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    # a full disk surfaces as OSError, as torch.save's RuntimeError, or as DCP's
    # CheckpointException (a BaseException, raised on every rank by DCP's own collectives)
    error: Optional[BaseException] = None
    try:
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        torch.save({"rng": rng_state(), "progress": progress}, tmp / f"rank{rank()}.pt")
    except (OSError, RuntimeError, CheckpointException) as err:
        error = err
    failed = any_rank(error is not None)  # every rank learns of a failure: none waits for another
    if not failed and is_rank_zero():
        try:
            _write_manifest(tmp)  # last: a checkpoint with a manifest is complete
        except (OSError, RuntimeError) as err:
            error = err
    if failed or any_rank(error is not None):
        # measured before the partial write is removed: torch's zip writer reports a full disk as
        # "unexpected pos ...", so the disk's state, not the message, tells
        free = free_space(root)
        try:
            nearly_full = shutil.disk_usage(root).free < FULL_BELOW
        except OSError:
            nearly_full = False
        full = error is not None and (is_disk_full(error) or nearly_full)
        if is_rank_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(root, checked=False)
        kept = (
            f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        )
        reason = _last_line(error) if error is not None else "another rank could not write its part"
        if full:
            reason = f"no space left on the disk: {free} at {root}; {reason}"
        raise CheckpointError(f"writing checkpoint {final} failed ({reason}); {kept}") from error
    if is_rank_zero():
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep is not None:
            for old in sorted(_matching(root, keep), key=lambda p: p[0])[:-keep_last]:
                shutil.rmtree(old[1], ignore_errors=True)
    _barrier()
    return final


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "crc32": crc32(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1))


def verify(path: Path) -> None:
    """
    Check a checkpoint against its manifest: every listed file present, of its size and CRC-32.

    Args:
        path (Path): a checkpoint directory.

    Raises:
        CheckpointError: naming the checkpoint, the file and what is wrong.
    """
    manifest = path / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: incomplete, or written by engagerec < 0.2"
        ) from None
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({err})") from None
    for name, expected in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {size:,} bytes, expected {expected['bytes']:,} (truncated?)"
            )
        if crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (damaged)")


def _matching(root: Path, pattern: re.Pattern):
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name))]


def latest(root: Path, pattern: re.Pattern = STEP_PATTERN, checked: bool = True) -> Optional[Path]:
    """The newest checkpoint under ``root`` whose name matches ``pattern`` (by step) and, when
    ``checked``, that checks out against its manifest; damaged ones are passed over with a note
    on stderr. None if there is none.

    Unfinished ``.tmp-`` directories never match.
    """
    skipped: List[str] = []
    for _, path in sorted(_matching(root, pattern), key=lambda p: p[0], reverse=True):
        if not checked:
            return path
        try:
            verify(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        for reason in skipped:
            print(f"{reason}; falling back to {path}", file=sys.stderr, flush=True)
        return path
    for reason in skipped:
        print(f"{reason}; no earlier checkpoint checks out", file=sys.stderr, flush=True)
    return None


def _read_rank_file(source: Path) -> Dict[str, Any]:
    """A rank's RNG and progress file, loaded with ``weights_only``: a checkpoint holds tensors
    and plain data, so opening one runs no pickled code."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {source} holds more than tensors and plain data; not loading it "
            f"(opening it would run pickled code): {str(err).splitlines()[0]}"
        ) from None
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {source} is unreadable ({err})") from None


def read_progress(path: Path) -> Dict[str, Any]:
    """The progress a checkpoint saved (rank 0's copy), without loading the model: what a resume
    is checked against before anything is loaded."""
    extra = _read_rank_file(path / "rank0.pt")
    if "progress" not in extra:
        raise CheckpointError(f"checkpoint {path}: rank0.pt holds no progress")
    return extra["progress"]


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[Any] = None,
    restore_rng: bool = True,
    checked: bool = False,
) -> Dict[str, Any]:
    """Restore model (and optimiser) in place from ``path``, after checking its manifest
    (unless ``checked``: ``latest`` has just done so); returns the saved progress. DCP
    reshards, so a checkpoint written by N ranks loads on M.

    Raises:
        CheckpointError: if the checkpoint does not match its manifest.
    """
    if not checked:
        verify(path)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        # Adam creates its state on the first step; DCP only fills keys that exist, so a fresh
        # optimiser must have its (zero) state created first or it silently stays empty.
        optimizer.init_state()
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    own = path / f"rank{rank()}.pt"
    extra = _read_rank_file(own if own.exists() else path / "rank0.pt")
    if restore_rng and own.exists():
        set_rng_state(extra["rng"])
    return extra["progress"]


def warm_start(path: Path, model: torch.nn.Module, optimizer: Any) -> Dict[str, Tuple[int, int]]:
    """
    Start a new run from another run's checkpoint: every tensor of the model and of the optimiser
    is loaded, whatever the sharding and world size either run had; the progress and RNG are not.

    A table grown since (more rows, the same columns: a vocabulary with new ids appended) gets
    the checkpoint's rows and optimiser state in its first rows and keeps its fresh initialisation
    in the others. Each rank reads a grown table's saved rows whole, so that costs the table's
    size in memory per rank while it loads.

    Args:
        path (Path): a checkpoint directory (``<run>/checkpoints/<name>``).
        model (torch.nn.Module): the new run's model (DistributedModelParallel), freshly built.
        optimizer: the new run's optimiser (a torchrec ``KeyedOptimizer``).

    Returns:
        Dict[str, Tuple[int, int]]: per grown tensor (its state-dict key), its saved and its rows.

    Raises:
        CheckpointError: the checkpoint fails its manifest, or holds other tensors: each
            missing, extra or reshaped tensor is named (another tower, tasks or features).

    Example::

        >>> # grown = warm_start(Path("runs/day1/checkpoints/best-step-800"), dmp, optimizer)
        >>> # {'model.sparse_arch.embedding_bags.t_content_id.weight': (5746, 6102), ...}
    """
    verify(path)
    optimizer.init_state()  # as in load: DCP fills only the state that exists
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    saved = {
        key: meta
        for key, meta in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    ours = dict(_tensor_leaves(state))
    differences = [f"{key} is not in the checkpoint" for key in ours if key not in saved]
    # the model's keys are the same on every rank; a fused optimiser's state is only on the ranks
    # that hold its table, and follows from the model's tensors
    differences += [
        f"{key} is in the checkpoint only" for key in saved if key.startswith("model.") and key not in ours
    ]
    grown: Dict[str, Tuple[Dict[str, Any], str, torch.Tensor, Tuple[int, ...]]] = {}
    for key, (parent, name, tensor) in ours.items():
        if key not in saved or tuple(saved[key].size) == tuple(tensor.shape):
            continue
        old, new = tuple(saved[key].size), tuple(tensor.shape)
        if len(old) == len(new) and old[1:] == new[1:] and old[0] < new[0]:
            grown[key] = (parent, name, tensor, old)
            parent[name] = torch.zeros(old, dtype=tensor.dtype)  # DCP reads the saved rows into it
        else:
            differences.append(f"{key} has shape {list(old)} in the checkpoint, {list(new)} here")
    if differences:
        shown = "; ".join(differences[:8]) + (
            f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        )
        raise CheckpointError(
            f"cannot start from {path}: it was written by a model with other tensors "
            f"(another tower, tasks or features): {shown}"
        )
    dcp.load(state, checkpoint_id=str(path))
    for parent, name, tensor, _ in grown.values():
        _copy_leading_rows(parent[name], tensor)
        parent[name] = tensor
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return {key: (old[0], int(tensor.shape[0])) for key, (_, _, tensor, old) in grown.items()}


def _tensor_leaves(tree: Dict[str, Any], prefix: str = ""):
    """(DCP key, (parent dict, key in it, tensor)) of every tensor in nested dicts: DCP names a
    nested value by its keys joined with dots."""
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict):
            yield from _tensor_leaves(value, key)
        elif isinstance(value, torch.Tensor):
            yield key, (tree, name, value)


def _copy_leading_rows(saved: torch.Tensor, target: torch.Tensor) -> None:
    """Copy the whole ``saved`` tensor into the first rows of ``target`` (this rank's part of
    it, for a ShardedTensor: each shard takes the rows and columns it holds)."""
    if not isinstance(target, ShardedTensor):
        with torch.no_grad():
            target[: saved.shape[0]].copy_(saved)
        return
    for shard in target.local_shards():
        offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        rows = min(sizes[0], saved.shape[0] - offsets[0])
        if rows <= 0:
            continue  # a shard of new rows only
        region = (slice(offsets[0], offsets[0] + rows),) + tuple(
            slice(start, start + size) for start, size in zip(offsets[1:], sizes[1:], strict=True)
        )
        with torch.no_grad():
            shard.tensor[:rows].copy_(saved[region])
