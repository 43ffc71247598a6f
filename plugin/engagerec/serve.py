"""``engagerec serve``: the raw-values program behind LitServe, JSON rows in, scores out.

Why LitServe: it is a serving engine (FastAPI and uvicorn in front, inference in worker
processes fed over a queue) with dynamic batching built in, and it adds a handful of small
packages, where Ray Serve brings a cluster runtime. A replica keeps no state between requests,
so serving past one machine is more replicas behind any HTTP load balancer (or LitServe's own
deployment); within a machine, ``--workers`` runs more inference processes.

What a request goes through, in order:

* ``RequestGuard`` (ASGI middleware, in the API process): with more than ``max_in_flight``
  requests already in flight it answers 503 at once, so overload sheds instead of queueing
  without bound; a body that is not JSON is a 400; a row that does not match the program's
  inputs (a missing or unknown field, a wrong type, NaN or infinity, no rows) is a 422 naming
  the field, e.g. ``rows[2].numbers.duration``; more rows than ``max_rows`` is a 413. Bad
  requests never reach the workers: LitServe answers every request of a batch with the error of
  any one of them, so one bad request must not join a batch.
* ``RawScoringAPI`` (LitServe's LitAPI, in the worker): rows to the raw program's tensors
  (the AOTInductor package when ``export --aoti`` wrote one, else the torch.export program),
  requests batched together (up to ``max_batch`` requests, waiting at most ``batch_timeout``),
  the program, one reply per request: ``{"model_version", "tasks", "predictions"}``.

A row is the documented raw client's (docs/SERVING.md): ``{"ids": {column: int or null},
"numbers": {column: float or null}, "recent": {column: [oldest, ..., latest]}, "dense":
{feature: float}, "sparse": {feature: [ids]}}``, the last two only for the inputs the client
encodes (inputs.json's ``raw`` section says which). ``GET /health`` answers ``ok``; ``GET
/info`` gives the model version and the export it serves.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import litserve as ls
import numpy as np
import torch

from engagerec.aoti import usable_package
from engagerec.data.manifest import crc32
from engagerec.errors import ConfigError

PREDICT_PATH = "/predict"


def model_version(export_dir: str | Path) -> str:
    """The served model's version: the raw program file's CRC-32 and its export's checkpoint.

    Args:
        export_dir (str | Path): an ``engagerec export`` directory.

    Returns:
        str: e.g. ``best-step-83/1a2b3c4d``.

    Example::

        >>> # model_version("export/kuairand")  # -> 'best-step-83/f719a79a'
    """
    export_dir = Path(export_dir)
    checkpoint = Path(json.loads((export_dir / "export.json").read_text())["checkpoint"]).name
    return f"{checkpoint}/{crc32(export_dir / 'model_raw_fp32.pt2'):08x}"


class BadRequest(ValueError):
    """A request the service refuses: its HTTP status and the message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_rows(body: Any, spec: Dict[str, Any], max_rows: int) -> List[Dict[str, Any]]:
    """The request's rows, checked against the raw program's inputs.

    Args:
        body: the parsed JSON body.
        spec (Dict[str, Any]): inputs.json's ``raw`` section.
        max_rows (int): the most rows a request may hold.

    Returns:
        List[Dict[str, Any]]: the rows.

    Raises:
        BadRequest: 422 naming the first field that does not match, 413 for too many rows.

    Example::

        >>> spec = {"ids": {"columns": ["user_id"]}, "numbers": {"columns": ["age"]},
        ...         "recent": {"ids": [], "outcomes": []}, "dense": {"features": []},
        ...         "sparse": {"features": []}}
        >>> len(check_rows({"rows": [{"ids": {"user_id": 3}, "numbers": {"age": None}}]}, spec, 10))
        1
        >>> try:
        ...     check_rows({"rows": [{"ids": {"user_id": "3"}, "numbers": {"age": 1.0}}]}, spec, 10)
        ... except BadRequest as err:
        ...     print(err.status, err)
        422 rows[0].ids.user_id: expected an integer or null, got '3'
    """
    if not isinstance(body, dict) or set(body) != {"rows"}:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise BadRequest(422, f'body: expected {{"rows": [row, ...]}}, got {keys}')
    rows = body["rows"]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(422, "rows: expected a list of one row or more")
    if len(rows) > max_rows:
        raise BadRequest(413, f"rows: {len(rows)} rows, more than the {max_rows} a request may hold")
    fields = {
        "ids": (spec["ids"]["columns"], _integer),
        "numbers": (spec["numbers"]["columns"], _number),
        "recent": (spec["recent"]["ids"] + spec["recent"]["outcomes"], None),
        "dense": (spec["dense"]["features"], _finite),
        "sparse": (spec["sparse"]["features"], None),
    }
    outcomes = set(spec["recent"]["outcomes"])
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise BadRequest(422, f"{where}: expected an object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise BadRequest(422, f"{where}.{unknown[0]}: unknown field (expected {sorted(fields)})")
        for name, (columns, check) in fields.items():
            if not columns and not row.get(name):  # nothing of this kind to give: absent or {}
                continue
            part = row.get(name)
            if not isinstance(part, dict):
                raise BadRequest(422, f"{where}.{name}: missing (expected an object of {columns})")
            extra = sorted(set(part) - set(columns))
            if extra:
                raise BadRequest(
                    422, f"{where}.{name}.{extra[0]}: unknown feature (expected one of {columns})"
                )
            for column in columns:
                if column not in part:
                    raise BadRequest(422, f"{where}.{name}.{column}: missing")
                value, at = part[column], f"{where}.{name}.{column}"
                if name == "recent":
                    _check_list(value, at, _number if column in outcomes else _integer)
                elif name == "sparse":
                    _check_list(value, at, _integer, allow_none=False)
                    largest = spec["sparse"].get("max_id", {}).get(column, INT64[1])
                    if value and not 0 <= min(value) <= max(value) <= largest:
                        bad = next(v for v in value if not 0 <= v <= largest)
                        raise BadRequest(422, f"{at}: ids lie in [0, {largest}], got {bad}")
                else:
                    check(value, at)
        recent = [len(row["recent"][c]) for c in fields["recent"][0]] if fields["recent"][0] else []
        if len(set(recent)) > 1:
            raise BadRequest(
                422, f"{where}.recent: every column must list the same views, got lengths {recent}"
            )
    return rows


INT64 = (-(2**63), 2**63 - 1)


def _integer(value: Any, at: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(422, f"{at}: expected an integer or null, got {_shown(value)}")
    if not INT64[0] <= value <= INT64[1]:
        raise BadRequest(422, f"{at}: expected a 64-bit integer, got {_shown(value)}")


def _number(value: Any, at: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(422, f"{at}: expected a number or null, got {_shown(value)}")
    if isinstance(value, int) and abs(value) > 1e308:  # past float64: math.isfinite would overflow
        raise BadRequest(422, f"{at}: expected a finite number, got an integer of {len(str(value))} digits")
    if not math.isfinite(value):
        raise BadRequest(422, f"{at}: expected a finite number, got {value!r}")


def _shown(value: Any) -> str:
    """A value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: Any, at: str) -> None:
    if value is None:
        raise BadRequest(422, f"{at}: expected a number, got null")
    _number(value, at)


def _check_list(value: Any, at: str, check, allow_none: bool = True) -> None:
    if not isinstance(value, list):
        raise BadRequest(422, f"{at}: expected a list, got {type(value).__name__}")
    # the common case in one pass: every item an int, or (for numbers) a finite float or int
    if check is _integer and all(type(item) is int and INT64[0] <= item <= INT64[1] for item in value):
        return
    if check is _number and all(
        type(item) is int or (type(item) is float and math.isfinite(item)) for item in value
    ):
        return
    for j, item in enumerate(value):  # else find the first bad item, to name it
        if item is None and not allow_none:
            raise BadRequest(422, f"{at}[{j}]: expected an integer, got null")
        check(item, f"{at}[{j}]")


def rows_to_inputs(rows: List[Dict[str, Any]], spec: Dict[str, Any]) -> Tuple[Any, ...]:
    """Checked rows as the raw program's inputs (null: the missing id, or NaN for a number).

    Args:
        rows (List[Dict[str, Any]]): rows ``check_rows`` accepted (of one or more requests).
        spec (Dict[str, Any]): inputs.json's ``raw`` section.

    Returns:
        ``(ids, numbers, recent, recent_lengths, dense, sparse_ids, sparse_offsets)``.

    Example::

        >>> spec = {"ids": {"columns": ["user_id"], "missing": -124}, "numbers": {"columns": []},
        ...         "recent": {"ids": ["video_id"], "outcomes": [], "views_needed": 3},
        ...         "dense": {"features": []}, "sparse": {"features": []}}
        >>> rows = [{"ids": {"user_id": None}, "recent": {"video_id": [4, 5, 6, 7]}},
        ...         {"ids": {"user_id": 9}, "recent": {"video_id": []}}]
        >>> ids, _, recent, lengths, *_ = rows_to_inputs(rows, spec)
        >>> ids["user_id"].tolist(), recent["video_id"].tolist(), lengths.tolist()
        ([-124, 9], [[5, 6, 7], [-124, -124, -124]], [3, 0])
    """
    missing = spec["ids"]["missing"]

    def column(values, dtype, none):
        return torch.tensor([none if v is None else v for v in values], dtype=dtype)

    ids = {c: column([r["ids"][c] for r in rows], torch.int64, missing) for c in spec["ids"]["columns"]}
    numbers = {
        c: column([r["numbers"][c] for r in rows], torch.float64, math.nan)
        for c in spec["numbers"]["columns"]
    }
    views = spec["recent"]["ids"] + spec["recent"]["outcomes"]
    # the longest history reads this many earlier views; the program cuts more, so do we, before
    # one row's long list pads every row of the batch to its length
    keep = max(1, int(spec["recent"].get("views_needed") or 1))
    lengths = torch.tensor(
        [min(len(r["recent"][views[0]]), keep) if views else 0 for r in rows], dtype=torch.int64
    )
    width = max(1, int(lengths.max()))
    recent = {}
    for c in views:  # one flat list per column, padded after each row's views: one tensor, no stack
        dtype, none = (torch.int64, missing) if c in spec["recent"]["ids"] else (torch.float64, math.nan)
        flat: List[Any] = []
        for r in rows:
            values = r["recent"][c][-keep:]  # the latest views
            flat.extend(none if v is None else v for v in values)
            flat.extend([none] * (width - len(values)))
        recent[c] = torch.tensor(flat, dtype=dtype).view(len(rows), width)
    dense = {
        f: column([r["dense"][f] for r in rows], torch.float32, math.nan) for f in spec["dense"]["features"]
    }
    sparse_ids, sparse_offsets = {}, {}
    for f in spec["sparse"]["features"]:
        sizes = [len(r["sparse"][f]) for r in rows]
        sparse_ids[f] = torch.tensor([i for r in rows for i in r["sparse"][f]], dtype=torch.int64)
        sparse_offsets[f] = torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.int64)
    return ids, numbers, recent, lengths, dense, sparse_ids, sparse_offsets


class RequestGuard:
    """
    ASGI middleware ahead of LitServe's routes: sheds load with 503 past ``max_in_flight``
    requests, and answers a bad request to ``/predict`` itself (400 not JSON, 413 too many
    rows or bytes, 422 a field that does not match), so that only valid requests reach the
    batching workers. Every answer names the model version.

    Args:
        app: the ASGI app it wraps.
        spec (Dict[str, Any]): inputs.json's ``raw`` section.
        version (str): the model version (``model_version``).
        max_rows (int): rows a request may hold.
        max_in_flight (int): requests in flight (checked and queued) before it sheds.
        max_bytes (int): the largest body it reads.
    """

    def __init__(
        self, app, spec: Dict[str, Any], version: str, max_rows: int, max_in_flight: int, max_bytes: int
    ):
        self.app, self.spec, self.version = app, spec, version
        self.max_rows, self.max_in_flight, self.max_bytes = max_rows, max_in_flight, max_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        """One ASGI call: shed, refuse or pass a request on (see the class docstring)."""
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await self._answer(send, 503, f"overloaded: {self.in_flight} requests in flight; retry later")
            return
        self.in_flight += 1
        try:
            declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
            if declared.isdigit() and int(declared) > self.max_bytes:  # refused before it is read
                await self._answer(send, 413, f"body: {int(declared)} bytes, more than {self.max_bytes}")
                return
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_bytes:
                    await self._answer(send, 413, f"body: more than {self.max_bytes} bytes")
                    return
            body = b"".join(chunks)
            try:  # NaN and Infinity parse (as Python's json reads them): the field check names them
                parsed = json.loads(body)
            except (ValueError, RecursionError) as err:  # RecursionError: nested past Python's limit
                await self._answer(send, 400, f"body: not JSON ({type(err).__name__}: {str(err)[:200]})")
                return
            try:
                check_rows(parsed, self.spec, self.max_rows)
            except BadRequest as err:
                await self._answer(send, err.status, str(err))
                return
            sent = False

            async def replay():
                nonlocal sent
                if sent:  # the app reads the body once; later it waits for a disconnect
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    async def _answer(self, send, status: int, message: str) -> None:
        payload = json.dumps({"error": message, "model_version": self.version}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def load_program(path: Path):
    """A raw program to serve: an AOTInductor package (``*.aoti.pt2``) or a torch.export one.

    Args:
        path (Path): the file (``served_program`` chose it).

    Returns:
        A callable taking the raw program's inputs.

    Example::

        >>> # load_program(Path("export/kuairand/model_raw_fp32.aoti.pt2"))(*inputs)
    """
    if path.name.endswith(".aoti.pt2"):
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(str(path)).module()


def served_program(export_dir: Path) -> Path:
    """What the workers serve: the AOTInductor package when the export has one that was
    compiled from the raw program beside it and for this CPU (``aoti.usable_package``; 2-10x
    faster per call at small batches, benchmarks/RESULTS.md serving_latency), else the
    torch.export program.

    Args:
        export_dir (Path): an ``engagerec export`` directory.

    Example::

        >>> # served_program(Path("export/kuairand")).name  # -> 'model_raw_fp32.aoti.pt2'
    """
    return usable_package(export_dir) or export_dir / "model_raw_fp32.pt2"


class RawScoringAPI(ls.LitAPI):
    """
    The raw program in a LitServe worker: checked rows in, predictions out (one reply per
    request, its rows' predictions in order).

    Args:
        program_file (Path): what to serve (``served_program``).
        spec (Dict[str, Any]): the export's inputs.json.
        version (str): the model version every reply names.
        workers (int): inference processes on this machine (each takes its share of threads).
        **options: LitAPI's (max_batch_size, batch_timeout, api_path).
    """

    def __init__(self, program_file: Path, spec: Dict[str, Any], version: str, workers: int, **options: Any):
        super().__init__(**options)
        # not ``spec``: LitAPI's own attribute (an API spec such as OpenAI's)
        self.program_file, self.inputs, self.version, self.workers = program_file, spec, version, workers
        self.program_kind = "aoti" if program_file.name.endswith(".aoti.pt2") else "torch.export"

    def setup(self, device) -> None:
        """Load the program (once per worker process)."""
        # the cores but one (the API process parses and checks requests), shared by the workers:
        # on 2 cores one thread served 1.4x the requests of two, whose OpenMP spinning starved the API
        torch.set_num_threads(max(1, ((os.cpu_count() or 2) - 1) // self.workers))
        self.program = load_program(self.program_file)
        self.tasks = [t["name"] for t in self.inputs["tasks"]]

    def decode_request(self, request) -> List[Dict[str, Any]]:  # unannotated: LitServe reads the body as JSON
        """The request's rows (RequestGuard checked them before they were queued)."""
        return request["rows"]

    def batch(self, requests: List[List[Dict[str, Any]]]) -> Tuple[List[int], List[Dict[str, Any]]]:
        """Several requests' rows as one batch, with each request's row count."""
        return [len(rows) for rows in requests], [row for rows in requests for row in rows]

    def predict(self, batched: Tuple[List[int], List[Dict[str, Any]]]) -> List[Tuple[List[List[float]], int]]:
        """One program call for the batch; each request's predictions, with the batch's rows."""
        sizes, rows = batched
        with torch.no_grad():
            scores = self.program(*rows_to_inputs(rows, self.inputs["raw"])).tolist()
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        return [(scores[start : start + size], len(rows)) for start, size in zip(starts, sizes, strict=True)]

    def unbatch(self, output: List[Tuple[List[List[float]], int]]) -> List[Tuple[List[List[float]], int]]:
        """Already one entry per request."""
        return output

    def encode_response(self, output: Tuple[List[List[float]], int]):  # unannotated return: FastAPI reads it
        """The reply: the model version, the program kind, the tasks' names, one prediction row per
        row, and the rows of the batch it was scored in (dynamic batching, observable)."""
        predictions, batch_rows = output
        return {
            "model_version": self.version,
            "program": self.program_kind,
            "tasks": self.tasks,
            "predictions": predictions,
            "batch_rows": batch_rows,
        }


def build_server(
    export_dir: str | Path,
    max_rows: int = 4096,
    max_batch: int = 32,
    batch_timeout: float = 0.005,
    max_in_flight: int = 256,
    workers: int = 1,
    timeout: float = 30.0,
):
    """
    The LitServe server for an export's raw program (see the module docstring).

    Args:
        export_dir (str | Path): an ``engagerec export`` directory (its model_raw_fp32.pt2).
        max_rows (int): rows a request may hold. Default: 4096.
        max_batch (int): requests a worker scores together. Default: 32.
        batch_timeout (float): seconds a worker waits to fill a batch. Default: 0.005.
        max_in_flight (int): requests in flight before the server sheds with 503. Default: 256.
        workers (int): inference processes. Default: 1.
        timeout (float): seconds a request may wait in the queue (then 504). Default: 30.

    Returns:
        litserve.LitServer: call ``.run(host=..., port=...)``.

    Raises:
        ConfigError: the directory holds no raw program, or a limit below 1.

    Example::

        >>> # build_server("export/kuairand", max_batch=64).run(host="0.0.0.0", port=8000)
    """
    limits = {
        "max_rows": max_rows,
        "max_batch": max_batch,
        "max_in_flight": max_in_flight,
        "workers": workers,
    }
    low = {name: value for name, value in limits.items() if not value >= 1}
    if low or not (batch_timeout >= 0 and timeout > 0):
        raise ConfigError(
            f"engagerec serve: {low or {'batch_timeout': batch_timeout, 'timeout': timeout}}: expected "
            "max_rows, max_batch, max_in_flight and workers >= 1, batch_timeout >= 0 and timeout > 0"
        )
    export_dir = Path(export_dir)
    if not (export_dir / "model_raw_fp32.pt2").is_file() or not (export_dir / "inputs.json").is_file():
        raise ConfigError(
            f"{export_dir} holds no raw program (model_raw_fp32.pt2): run engagerec export first"
        )
    spec = json.loads((export_dir / "inputs.json").read_text())
    version = model_version(export_dir)

    guard = {
        "spec": spec["raw"],
        "version": version,
        "max_rows": max_rows,
        "max_in_flight": max_in_flight,
        # a row of the raw client's JSON with the longest history the model reads: a few KiB
        "max_bytes": max_rows * 16 * 1024 + 65536,
    }
    program = served_program(export_dir)
    api = RawScoringAPI(
        program,
        spec,
        version,
        workers,
        max_batch_size=max_batch,
        batch_timeout=batch_timeout,
        api_path=PREDICT_PATH,
    )
    return ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=workers,
        timeout=timeout,
        middlewares=[(RequestGuard, guard)],
        model_metadata={"model_version": version, "export": str(export_dir), "program": program.name},
    )


def serve(export_dir: str, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> Optional[int]:
    """``engagerec serve``: build the server (``build_server``'s options) and run it until stopped.

    Args:
        export_dir (str): an ``engagerec export`` directory.
        host (str): the interface to listen on. Default: 127.0.0.1.
        port (int): the port. Default: 8000.
        **options: ``build_server``'s keyword arguments.

    Returns:
        int: 0 once stopped (Ctrl-C or SIGTERM).

    Example::

        $ engagerec serve --export export/kuairand --port 8000
    """
    server = build_server(export_dir, **options)

    main = os.getpid()

    def stop(signum, frame):  # SIGTERM (a supervisor's stop) shuts down as Ctrl-C does: no orphaned workers
        if os.getpid() != main:  # a server process that inherited the handler, stopped by the main one
            raise SystemExit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(
        f"engagerec serve: {export_dir} on http://{host}:{port}{PREDICT_PATH} (health: /health)", flush=True
    )
    # one API process: RequestGuard's in-flight count is the server's, not one of several
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False)
    return 0
