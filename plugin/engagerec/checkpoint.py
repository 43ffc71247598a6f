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
from torch.distributed.tensor import DTensor

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


def warm_start(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any,
    source_rows: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, Any]:
    """
    Start a new run from another run's checkpoint (already verified, as ``latest`` does): the
    model and optimiser tensors are loaded, whatever the sharding and world size either run had;
    the progress and RNG are not.

    A table whose rows moved (its vocabulary changed) is given as ``source_rows[table]``: for
    each of its rows, the saved row it takes, or -1 for a row that starts fresh (a new id). Its
    weights, and optimiser state laid out by row, are moved accordingly. Each rank reads such a
    tensor's saved rows whole: that costs its saved size in memory per rank while it loads.

    The optimiser state of a table starts fresh, and is reported, where it cannot be carried
    over: another sparse optimiser, or state laid out per column shard (row-wise state of a
    column-wise table) whose rows moved or whose shards differ.

    Args:
        path (Path): a checkpoint directory (``<run>/checkpoints/<name>``), verified.
        model (torch.nn.Module): the new run's model (DistributedModelParallel), freshly built.
        optimizer: the new run's optimiser (a torchrec ``KeyedOptimizer``).
        source_rows (Optional[Dict[str, np.ndarray]]): table name -> saved row per row (-1: fresh).

    Returns:
        Dict[str, Any]: ``moved``: per moved table, its saved and its rows and the rows kept;
        ``fresh_optimizer_state``: the state-dict keys whose optimiser state starts fresh.

    Raises:
        CheckpointError: the model's tensors differ from the checkpoint's (a missing, extra or
            reshaped one is named: another tower, tasks or features).

    Example::

        >>> # warm_start(Path("runs/day1/checkpoints/best-step-800"), dmp, optimizer,
        >>> #            {"t_content_id": np.array([0, 1, -1, 2, ...])})
    """
    source_rows = source_rows or {}
    optimizer.init_state()  # as in load: DCP fills only the state that exists
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    saved = {
        key: tuple(meta.size)
        for key, meta in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    ours = dict(_tensor_leaves(state))
    differences = [
        f"{key} is in the checkpoint only" for key in saved if key.startswith("model.") and key not in ours
    ]
    moved: Dict[str, Tuple[Dict[str, Any], str, torch.Tensor, np.ndarray]] = {}
    skipped: Dict[str, Tuple[Dict[str, Any], str, torch.Tensor]] = {}
    for key, (parent, name, tensor) in ours.items():
        if isinstance(tensor, DTensor):
            raise CheckpointError(
                f"cannot start from {path}: {key} is a DTensor, which a warm start does not load"
            )
        table = _table_of(key)
        rows = source_rows.get(table) if table else None
        shape, old = tuple(tensor.shape), saved.get(key)
        # a tensor laid out by row (weights, row-wise or element-wise optimiser state) of a moved table
        by_row = (
            rows is not None
            and old is not None
            and len(shape) > 0
            and shape[0] == len(rows)
            and old[1:] == shape[1:]
        )
        if by_row:
            moved[key] = (parent, name, tensor, rows)
            parent[name] = torch.zeros(old, dtype=tensor.dtype)  # DCP reads the saved rows into it
        elif old == shape and (rows is None or len(shape) == 0):
            continue  # loaded as it is, resharded by DCP (a step count of a moved table too)
        elif key.startswith("model."):
            seen = "not in the checkpoint" if old is None else f"shape {list(old)} in the checkpoint"
            differences.append(f"{key}: {seen}, {list(shape)} here")
        else:  # optimiser state that cannot be carried over: this table's starts fresh
            skipped[key] = (parent, name, tensor)
            del parent[name]
    if differences:
        shown = "; ".join(differences[:8]) + (
            f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        )
        raise CheckpointError(
            f"cannot start from {path}: it was written by a model with other tensors "
            f"(another tower, tasks or features): {shown}"
        )
    emptied = _prune_empty(state)  # DCP would take an emptied dict for a missing value
    dcp.load(state, checkpoint_id=str(path))
    for parent, name, value in reversed(emptied):
        parent[name] = value
    for parent, name, tensor, rows in moved.values():
        _copy_rows(parent[name], tensor, rows)
        parent[name] = tensor
    for parent, name, tensor in skipped.values():
        parent[name] = tensor  # the fresh state, as initialised
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return {
        "moved": {
            _table_of(key): {"rows": [int(saved[key][0]), len(rows)], "kept": int((rows >= 0).sum())}
            for key, (_, _, _, rows) in moved.items()
            if key.startswith("model.")
        },
        "fresh_optimizer_state": sorted(skipped),
    }


def _table_of(key: str) -> Optional[str]:
    """The embedding table a state-dict key belongs to (its weight or its optimiser state)."""
    found = re.search(r"embedding_bags\.(t_[^.]+)\.weight", key)
    return found.group(1) if found else None


def _prune_empty(tree: Dict[str, Any]) -> List[Tuple[Dict[str, Any], str, Dict[str, Any]]]:
    """Remove the dicts left empty under ``tree`` (deepest first); returns (parent, key, dict)
    of each, to put back in reverse order."""
    removed: List[Tuple[Dict[str, Any], str, Dict[str, Any]]] = []
    for name, value in list(tree.items()):
        if isinstance(value, dict):
            removed += _prune_empty(value)
            if not value:
                removed.append((tree, name, value))
                del tree[name]
    return removed


def _tensor_leaves(tree: Dict[str, Any], prefix: str = ""):
    """(DCP key, (parent dict, key in it, tensor)) of every tensor in nested dicts: DCP names a
    nested value by its keys joined with dots."""
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict):
            yield from _tensor_leaves(value, key)
        elif isinstance(value, torch.Tensor):
            yield key, (tree, name, value)


def _copy_rows(saved: torch.Tensor, target: torch.Tensor, rows: np.ndarray) -> None:
    """Row ``i`` of ``target`` (this rank's part of it, for a ShardedTensor: each shard takes the
    rows and columns it holds) becomes saved row ``rows[i]``; rows of -1 keep their value."""
    shards = (
        [(shard.tensor, shard.metadata.shard_offsets) for shard in target.local_shards()]
        if isinstance(target, ShardedTensor)
        else [(target, [0] * target.dim())]
    )
    for local, offsets in shards:
        wanted = torch.from_numpy(rows[offsets[0] : offsets[0] + local.shape[0]])
        here = torch.nonzero(wanted >= 0).flatten()
        values = saved[wanted[here]]
        for dim, start in enumerate(offsets[1:], start=1):  # a column shard: its columns
            values = values.narrow(dim, start, local.shape[dim])
        with torch.no_grad():
            local[here] = values.to(local.device, local.dtype)
