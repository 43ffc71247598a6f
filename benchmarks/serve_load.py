"""A bounded load test of `engagerec serve` on localhost: QPS and p50/p99 latency per request at
1, 8 and 32 concurrent clients, and every failed request counted.

    .venv/bin/python benchmarks/serve_load.py --export EXPORT_DIR [--concurrency 1 8 32]
        [--requests 400] [--rows 16] [--workers 1]

Starts `engagerec serve` on a free port (its defaults: batches of up to 32 requests gathered for
5 ms, 256 requests in flight before it sheds), waits for /health, then for each concurrency runs
that many client threads, each sending its share of ``--requests`` requests of ``--rows`` rows of
raw values back to back (keep-alive connections, Python's http.client). Rows are drawn from the
export's vocabularies with each row's longest history, as benchmarks/serving_latency.py does.
A request fails on any status but 200 or a reply without a prediction per row. Writes the
section ``serve_load`` of benchmarks/RESULTS.md. The clients share the machine with the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import machine_block, write_section  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bodies(export: Path, count: int, rows: int, seed: int = 0) -> List[bytes]:
    """``count`` request bodies of ``rows`` rows of raw values each."""
    spec = json.loads((export / "inputs.json").read_text())["raw"]
    rng = np.random.default_rng(seed)
    vocabs = {}
    for column in set(spec["ids"]["columns"]) | set(spec["recent"]["ids"]):
        path = export / "encoding" / "vocabs" / f"{column}.parquet"
        tokens = pq.read_table(path).column("token").to_numpy() if path.is_file() else np.zeros(1, np.int64)
        vocabs[column] = tokens if tokens.dtype.kind in "iu" else np.zeros(1, np.int64)
    views = min(spec["recent"]["views_needed"], 50)

    def row() -> Dict[str, Any]:
        return {
            "ids": {c: int(rng.choice(vocabs[c])) for c in spec["ids"]["columns"]},
            "numbers": {c: float(abs(rng.standard_normal())) for c in spec["numbers"]["columns"]},
            "recent": {
                **{c: [int(v) for v in rng.choice(vocabs[c], views)] for c in spec["recent"]["ids"]},
                **{c: [float(v) for v in rng.random(views)] for c in spec["recent"]["outcomes"]},
            },
            "dense": {f: 0.0 for f in spec["dense"]["features"]},
            "sparse": {f: [1] for f in spec["sparse"]["features"]},
        }

    pool = [row() for _ in range(256)]  # drawn once, combined into requests
    return [
        json.dumps({"rows": [pool[i] for i in rng.integers(0, len(pool), rows)]}).encode()
        for _ in range(count)
    ]


def _client(port: int, bodies: List[bytes], rows: int, latencies: List[float], failures: List[str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for body in bodies:
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            payload = reply.read()
            if reply.status != 200 or len(json.loads(payload)["predictions"]) != rows:
                failures.append(f"{reply.status}: {payload[:200]!r}")
            else:  # latencies of answered requests only
                latencies.append(time.perf_counter() - start)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
            failures.append(repr(err))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.close()


def _run(port: int, bodies: List[bytes], rows: int, concurrency: int) -> Dict[str, Any]:
    latencies: List[float] = []
    failures: List[str] = []
    shares = [bodies[i::concurrency] for i in range(concurrency)]
    threads = [
        threading.Thread(target=_client, args=(port, share, rows, latencies, failures)) for share in shares
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(bodies),
        "failed": len(failures),
        "first_failures": failures[:3],
        "qps": len(bodies) / seconds,
        "rows_per_s": len(bodies) * rows / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="an engagerec export directory")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency")
    parser.add_argument("--rows", type=int, default=16, help="rows per request")
    parser.add_argument("--workers", type=int, default=1, help="the server's inference processes")
    args = parser.parse_args()
    export, port = Path(args.export), _free_port()
    command = [sys.executable, "-m", "engagerec", "serve", "--export", str(export), "--port", str(port)]
    server = subprocess.Popen(
        command + ["--workers", str(args.workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().read() == b"ok":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("engagerec serve did not start")
            time.sleep(0.5)
        bodies = _bodies(export, args.requests, args.rows)
        _run(port, bodies[: min(40, len(bodies))], args.rows, 4)  # warm-up, not reported
        measured = {c: _run(port, bodies, args.rows, c) for c in args.concurrency}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    for c, m in measured.items():
        latency = f"p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms"
        print(f"{c} clients: {m['qps']:.0f} requests/s, {latency}, {m['failed']} failed")
    command_line = (
        f".venv/bin/python benchmarks/serve_load.py --export {args.export} --concurrency "
        f"{' '.join(map(str, args.concurrency))} --requests {args.requests} --rows {args.rows} "
        f"--workers {args.workers}"
    )
    lines = [
        machine_block(command_line),
        "",
        f"`engagerec serve` on {export} (its defaults: batches of up to 32 requests gathered for 5 ms, "
        f"{args.workers} inference process(es)); {args.requests} requests of {args.rows} rows of raw "
        "values per concurrency, the clients on the same machine (module docstring).",
        "",
        "| clients | requests/s | rows/s | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|",
    ]
    for c, m in measured.items():
        lines.append(
            f"| {c} | {m['qps']:,.0f} | {m['rows_per_s']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{m['failed']} of {m['requests']} |"
        )
    write_section("serve_load", "\n".join(lines))


if __name__ == "__main__":
    main()
