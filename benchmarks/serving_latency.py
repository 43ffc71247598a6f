"""Serving latency: p50 and p99 per call at batches of 1, 16, 256 and 4096 rows, for every form
a trained run's model is served in, and each form's size on disk.

    .venv/bin/python benchmarks/serving_latency.py --run RUN_DIR [--run RUN_DIR ...] --work DIR
        [--batches 1 16 256 4096] [--calls 200]

Per run, it exports the run into ``--work`` (``engagerec export --int8 --aoti``, kept when there)
and builds the C++ client (``make cpp-client``), then times in one process, with torch's default
intra-op threads (the machine's cores), each form on the same rows:

  eager fp32         export.ServingModel, the unsharded model as a module (encoded inputs)
  export fp32, int8  model_fp32.pt2 / model_int8.pt2 from torch.export.load (encoded inputs)
  raw fp32           model_raw_fp32.pt2: raw values in, the encoding inside (raw inputs)
  AOTI Python / C++  model_raw_fp32.aoti.pt2 by torch._inductor.aoti_load_package, and by the
                     C++ client (clients/cpp/score_raw.cpp --time) in its own process

Encoded inputs are the first rows of the run's test split; raw inputs are drawn at random from
the run's vocabularies (ids), a standard normal (numbers) and each row with the longest history
the model reads, so every table is read at random rows, as a stream of users would. Warm-up
calls first (10), then ``--calls`` timed calls (fewer at large batches: at most 200,000 rows,
at least 20 calls). Writes the section ``serving_latency`` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import machine_block, write_section  # noqa: E402

CLIENT = REPO / "build" / "cpp" / "score_raw"
WARMUP = 10
MAX_ROWS = 200_000  # timed rows per form and batch (at 4,096 rows: 48 calls)


def _percentiles(seconds: List[float]) -> Dict[str, float]:
    values = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def _time(call: Callable[[], Any], calls: int) -> Dict[str, float]:
    with torch.no_grad():
        for _ in range(WARMUP):
            call()
        taken = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            taken.append(time.perf_counter() - start)
    return _percentiles(taken)


def _encoded_inputs(run: Path, names: List[str], rows: int):
    from engagerec.data.reader import ShardReader, make_loader
    from engagerec.export import serving_inputs
    from engagerec.runs import run_config

    data_dir = run_config(run).train.data_dir
    reader = ShardReader(data_dir, "test", batch_size=rows, rank=0, world_size=1)
    batch = next(iter(make_loader(reader)))
    if batch.dense_features.shape[0] != rows:
        raise SystemExit(f"{data_dir}'s test split has fewer than {rows} rows: drop that batch size")
    return serving_inputs(batch, names)


def _raw_inputs(export: Path, rows: int, seed: int = 0):
    """Raw inputs of ``rows`` rows (see the module docstring), as the raw program takes them."""
    spec = json.loads((export / "inputs.json").read_text())["raw"]
    rng = np.random.default_rng(seed)
    vocabs = export / "encoding" / "vocabs"

    def ids(column: str, shape) -> torch.Tensor:
        path = vocabs / f"{column}.parquet"
        if path.is_file():
            tokens = pq.read_table(path).column("token").to_numpy()
            if tokens.dtype.kind in "iu":
                return torch.from_numpy(rng.choice(tokens, size=shape).astype(np.int64))
        return torch.zeros(shape, dtype=torch.int64)

    views = spec["recent"]["views_needed"]
    recent = {c: ids(c, (rows, views)) for c in spec["recent"]["ids"]}
    recent |= {c: torch.from_numpy(rng.random((rows, views))) for c in spec["recent"]["outcomes"]}
    return (
        {c: ids(c, rows) for c in spec["ids"]["columns"]},
        {c: torch.from_numpy(np.abs(rng.standard_normal(rows))) for c in spec["numbers"]["columns"]},
        recent,
        torch.full((rows,), views, dtype=torch.int64),
        {f: torch.zeros(rows) for f in spec["dense"]["features"]},
        {f: torch.ones(rows, dtype=torch.int64) for f in spec["sparse"]["features"]},
        {f: torch.arange(rows, dtype=torch.int64) for f in spec["sparse"]["features"]},
    )


def _cpp(export: Path, package: str, inputs, calls: int) -> Dict[str, float]:
    from engagerec.aoti import flat_inputs

    order = json.loads((export / "inputs.json").read_text())["raw"]["aoti"]["inputs"]
    with tempfile.TemporaryDirectory() as work:
        torch.save(flat_inputs(inputs, order), f"{work}/inputs.pt")
        # its own warm-up: the first call (written out) and the timed ones after it
        done = subprocess.run(
            [str(CLIENT), str(export / package), f"{work}/inputs.pt", f"{work}/out.pt", "--time", str(calls)],
            capture_output=True,
            text=True,
            check=True,
        )
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    return {"p50_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"]}


def _measure(run: Path, export: Path, batches: List[int], calls: int) -> Dict[str, Any]:
    from engagerec.export import ServingModel, unsharded_model
    from engagerec.runs import run_config

    if not (export / "export.json").is_file() or "aoti" not in json.loads(
        (export / "export.json").read_text()
    ):
        subprocess.run(
            [sys.executable, "-m", "engagerec", "export", "--run-dir", str(run), "--out", str(export),
             "--int8", "--aoti"],
            check=True,
        )  # fmt: skip
    record = json.loads((export / "export.json").read_text())
    model, checkpoint, _ = unsharded_model(run)
    eager = ServingModel(model).eval()
    names = eager.feature_names
    programs = {
        kind: torch.export.load(str(export / record["programs"][kind]["file"])).module()
        for kind in ("fp32", "int8")
    }
    raw = torch.export.load(str(export / "model_raw_fp32.pt2")).module()
    package = record["aoti"]["fp32"]["file"]
    aoti = torch._inductor.aoti_load_package(str(export / package))
    sizes = {
        "eager fp32": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        "export fp32": record["programs"]["fp32"]["bytes"],
        "export int8": record["programs"]["int8"]["bytes"],
        "raw fp32": (export / "model_raw_fp32.pt2").stat().st_size,
        "AOTI Python": record["aoti"]["fp32"]["bytes"],
        "AOTI C++": record["aoti"]["fp32"]["bytes"],
    }
    rows: Dict[str, Dict[int, Dict[str, float]]] = {form: {} for form in sizes}
    for batch in batches:
        n = max(20, min(calls, MAX_ROWS // batch))
        encoded = _encoded_inputs(run, names, batch)
        raws = _raw_inputs(export, batch)
        forms = {
            "eager fp32": (eager, encoded),
            "export fp32": (programs["fp32"], encoded),
            "export int8": (programs["int8"], encoded),
            "raw fp32": (raw, raws),
            "AOTI Python": (aoti, raws),
        }
        for form, (module, inputs) in forms.items():
            rows[form][batch] = _time(functools.partial(module, *inputs), n)
        rows["AOTI C++"][batch] = _cpp(export, package, raws, n)
        print(
            f"{run.name} batch {batch}: "
            + ", ".join(f"{f} {r[batch]['p50_ms']:.2f} ms" for f, r in rows.items())
        )
    tables = {t.name: t.num_embeddings for t in model.tables}
    cfg = run_config(run)
    trained = f"config {cfg.name}, {cfg.train.epochs} epoch(s) on {cfg.train.data_dir}"
    return {"rows": rows, "sizes": sizes, "largest_table": max(tables.values()), "trained": trained}


def _table(name: str, measured: Dict[str, Any], batches: List[int]) -> List[str]:
    header = "| form | " + " | ".join(f"batch {b}: p50 / p99 ms" for b in batches) + " | on disk |"
    lines = [
        f"**{name}** ({measured['trained']}; largest table: {measured['largest_table']:,} rows)",
        "",
        header,
        "|" + "---|" * (len(batches) + 2),
    ]
    for form, per_batch in measured["rows"].items():
        cells = " | ".join(f"{per_batch[b]['p50_ms']:.2f} / {per_batch[b]['p99_ms']:.2f}" for b in batches)
        lines.append(f"| {form} | {cells} | {measured['sizes'][form] / 2**20:,.1f} MiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a run directory (repeatable)")
    parser.add_argument("--work", required=True, help="where the exports go (kept; reused)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    subprocess.run(["make", "-s", "cpp-client"], cwd=REPO, check=True)
    body: List[str] = []
    for run in map(Path, args.run):
        measured = _measure(run, Path(args.work) / run.name, args.batches, args.calls)
        body += _table(str(run), measured, args.batches) + [""]
    runs = " ".join(f"--run {r}" for r in args.run)
    command = (
        f".venv/bin/python benchmarks/serving_latency.py {runs} --work {args.work} "
        f"--batches {' '.join(map(str, args.batches))} --calls {args.calls}"
    )
    notes = [
        machine_block(command),
        "",
        "Per call, in one process with torch's default threads; encoded forms on the test split's first "
        "rows, raw forms on raw values drawn from the run's vocabularies with each row's longest "
        "history (module docstring): the raw forms' time includes the encoding (vocabulary lookups, "
        "history windows, id statistics) that the encoded forms were given done. eager fp32's size: its "
        "checkpoint; the AOTI package holds the raw program's code and weights. The runs: the bundled "
        "data under configs/kuairand_random.yaml, one epoch (`engagerec prepare` and `engagerec train "
        "--set train.epochs=1`), and KuaiRand-1K-shaped data at scale 1 under configs/kuairand_1k.yaml, "
        "one epoch (benchmarks/end_to_end_scale.py's run at scale 1).",
        "",
    ]
    write_section("serving_latency", "\n".join(notes + body))


if __name__ == "__main__":
    main()
