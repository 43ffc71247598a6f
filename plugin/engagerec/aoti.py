"""The raw-values program compiled ahead of time (AOTInductor), for serving from C++.

``engagerec export --aoti`` compiles ``model_raw_fp32.pt2`` with
``torch._inductor.aoti_compile_and_package`` into ``model_raw_fp32.aoti.pt2``: a package of
native code and weights that ``torch::inductor::AOTIModelPackageLoader`` runs from C++
(``clients/cpp/score_raw.cpp``, built by ``make cpp-client``) and
``torch._inductor.aoti_load_package`` from Python, with no engagerec, torchrec or Python
interpreter on the C++ side. The package was compiled for this machine's CPU (its ISA) and this
torch release; compile it again for another.

A C++ caller passes the program's inputs as one flat list of tensors. ``input_order`` reads
that order from the program (what ``inputs.json`` lists under ``raw.aoti.inputs``), and
``flat_inputs`` puts the Python inputs (``export.raw_example``'s structure) in it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path, tree_unflatten

from engagerec.data.manifest import crc32
from engagerec.errors import ConfigError

# the raw program's positional arguments (export.RAW_CALL)
ARGUMENTS = ("ids", "numbers", "recent", "recent_lengths", "dense", "sparse_ids", "sparse_offsets")
CLIENT = "clients/cpp/score_raw.cpp"


TOLERANCE = 1e-5  # the package's largest difference from its program, checked when compiled


def package_name(kind: str = "fp32") -> str:
    """The AOTInductor package's file name for a raw program of ``kind``.

    Args:
        kind (str): fp32 or int8. Default: fp32.

    Example::

        >>> package_name()
        'model_raw_fp32.aoti.pt2'
    """
    return f"model_raw_{kind}.aoti.pt2"


def usable_package(export_dir: str | Path, kind: str = "fp32") -> Optional[Path]:
    """The export's AOTInductor package if it may serve here: compiled from the raw program
    that is beside it now (the CRC-32 inputs.json recorded) and for this machine's CPU
    capability (a package for AVX-512 would stop an AVX2 machine with an illegal instruction,
    which no exception handler sees). None otherwise.

    Args:
        export_dir (str | Path): an ``engagerec export`` directory.
        kind (str): fp32 or int8. Default: fp32.

    Example::

        >>> # usable_package("export/kuairand")  # -> Path("export/kuairand/model_raw_fp32.aoti.pt2")
    """
    export_dir = Path(export_dir)
    package, program = export_dir / package_name(kind), export_dir / f"model_raw_{kind}.pt2"
    if not package.is_file() or not program.is_file():
        return None
    recorded = json.loads((export_dir / "inputs.json").read_text())["raw"].get("aoti", {})
    if recorded.get("package") != package.name or recorded.get("source_crc32") != f"{crc32(program):08x}":
        return None
    if recorded.get("cpu_isa") != torch.backends.cpu.get_cpu_capability():
        return None
    return package


def input_order(program: torch.export.ExportedProgram) -> List[Dict[str, Any]]:
    """The program's inputs in the order a flat call takes them (AOTInductor's C++ ``run``).

    Args:
        program (torch.export.ExportedProgram): a raw program (``model_raw_*.pt2``, loaded).

    Returns:
        List[Dict[str, Any]]: per input, ``argument`` (one of ``ARGUMENTS``) and ``key`` (the
        column or feature of a per-column argument, None for ``recent_lengths``).

    Example::

        >>> # input_order(torch.export.load("export/model_raw_fp32.pt2"))[:2]
        >>> # [{'argument': 'ids', 'key': 'author_id'}, {'argument': 'ids', 'key': 'content_id'}]
    """
    spec = program.call_spec.in_spec
    positions = tree_unflatten(list(range(spec.num_leaves)), spec)  # (args, kwargs) of leaf indices
    order = []
    for path, _ in tree_flatten_with_path(positions)[0]:
        if not (isinstance(path[0], SequenceKey) and path[0].idx == 0 and isinstance(path[1], SequenceKey)):
            raise ConfigError(f"the raw program takes an input outside its positional arguments: {path}")
        key = path[2].key if len(path) > 2 and isinstance(path[2], MappingKey) else None
        order.append({"argument": ARGUMENTS[path[1].idx], "key": key})
    return order


def flat_inputs(inputs: Sequence[Any], order: List[Dict[str, Any]]) -> List[torch.Tensor]:
    """The raw program's inputs as the flat list ``order`` describes.

    Args:
        inputs (Sequence[Any]): ``(ids, numbers, recent, recent_lengths, dense, sparse_ids,
            sparse_offsets)``, as the raw program takes them.
        order (List[Dict[str, Any]]): ``input_order``'s list (or inputs.json's ``raw.aoti.inputs``).

    Returns:
        List[torch.Tensor]: one tensor per entry of ``order``.

    Example::

        >>> ids, lengths = {"user_id": torch.tensor([7, 9])}, torch.tensor([0, 2])
        >>> order = [{"argument": "recent_lengths", "key": None}, {"argument": "ids", "key": "user_id"}]
        >>> [t.tolist() for t in flat_inputs((ids, {}, {}, lengths, {}, {}, {}), order)]
        [[0, 2], [7, 9]]
    """
    values = dict(zip(ARGUMENTS, inputs, strict=True))
    return [
        values[entry["argument"]] if entry["key"] is None else values[entry["argument"]][entry["key"]]
        for entry in order
    ]


def compile_package(export_dir: str | Path, kind: str = "fp32") -> Dict[str, Any]:
    """Compile ``export_dir``'s raw program of ``kind`` into an AOTInductor package beside it,
    check the package scores as the program does, and record it in inputs.json (the flat input
    order) and export.json.

    Args:
        export_dir (str | Path): a directory ``engagerec export`` wrote.
        kind (str): fp32 or int8 (``model_raw_<kind>.pt2``). Default: fp32.

    Returns:
        Dict[str, Any]: the package's file, size, compile seconds, and its largest difference
        from the program on the program's example inputs.

    Raises:
        ConfigError: the export holds no raw program of ``kind``.

    Example::

        >>> # compile_package("export/kuairand")["max_abs_difference_vs_program"]
        >>> # 0.0
    """
    export_dir = Path(export_dir)
    source = export_dir / f"model_raw_{kind}.pt2"
    if not source.is_file():
        raise ConfigError(f"{source} does not exist: export the run first (engagerec export)")
    program = torch.export.load(str(source))
    started = time.perf_counter()
    package = export_dir / package_name(kind)
    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    seconds = time.perf_counter() - started
    args, kwargs = program.example_inputs
    loaded = torch._inductor.aoti_load_package(str(package))
    with torch.no_grad():
        difference = float((loaded(*args, **kwargs) - program.module()(*args, **kwargs)).abs().max())
    if not difference <= TOLERANCE:  # NaN too
        package.unlink()
        raise ConfigError(
            f"the AOTInductor package of {source.name} scores {difference:.2e} away from the program "
            f"(tolerance {TOLERANCE}); not kept"
        )
    record = {
        "file": package.name,
        "bytes": package.stat().st_size,
        "compile_seconds": round(seconds, 1),
        "max_abs_difference_vs_program": difference,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
    }
    inputs_file = export_dir / "inputs.json"
    spec = json.loads(inputs_file.read_text())
    spec["raw"]["aoti"] = {
        "package": package.name,
        "inputs": input_order(program),
        "call": "AOTIModelPackageLoader(package).run(inputs) -> [predictions [B, tasks] float32]",
        "client": CLIENT,
        "compiled_for": f"{record['cpu_isa']} CPUs, torch {torch.__version__}",
        "cpu_isa": record["cpu_isa"],
        "source_crc32": f"{crc32(source):08x}",  # the program it was compiled from
    }
    inputs_file.write_text(json.dumps(spec, indent=1))
    export_file = export_dir / "export.json"
    if export_file.is_file():
        exported = json.loads(export_file.read_text())
        exported.setdefault("aoti", {})[kind] = record
        export_file.write_text(json.dumps(exported, indent=1))
    return record
