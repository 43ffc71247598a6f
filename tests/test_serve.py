"""engagerec serve: JSON rows of raw values in, the raw program's scores out, over HTTP (LitServe);
each bad request a 4xx naming its field while the service keeps serving, overload shed with 503."""

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port
from engagerec.export import export_run
from engagerec.serve import rows_to_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(kuairand_run, tmp_path_factory):
    """The bundled run exported with its AOTInductor package (what the workers serve) and served
    on a free port, at most 2 requests in flight and batches gathered for 0.4 s: (base URL, the
    export's inputs.json, the export directory)."""
    run, _ = kuairand_run
    export = tmp_path_factory.mktemp("serve") / "export"
    export_run(run, export, check_rows=1000, aoti=True)
    port = free_port()
    command = [sys.executable, "-m", "engagerec", "serve", "--export", str(export), "--port", str(port)]
    command += ["--max-in-flight", "2", "--batch-timeout", "0.4", "--max-rows", "50"]
    log = open(export.parent / "serve.log", "w")  # a file, never a pipe nobody reads while it runs
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.read() == b"ok":
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the service did not start: {(export.parent / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.5)
    children = _descendants(process.pid)
    assert len(children) >= 2  # its API server and inference processes
    yield url, json.loads((export / "inputs.json").read_text()), export
    process.terminate()  # SIGTERM, as a supervisor stops it
    assert process.wait(timeout=60) == 0
    log.close()
    # and takes its server and inference processes with it: none is left running
    for _ in range(60):
        if not [pid for pid in children if Path(f"/proc/{pid}").exists()]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"engagerec serve left processes {children} running after it stopped")


def _descendants(pid):
    """Every process started by ``pid``, at any depth (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = entry.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                child = int(entry.parent.name)
                found.append(child)
                frontier.append(child)
    return found


def _post(url, body=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/predict", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _rows(spec, count, seed, views):
    """``count`` rows of raw values, each with ``views`` earlier views."""
    rng = np.random.default_rng(seed)
    raw = spec["raw"]
    return [
        {
            "ids": {c: int(rng.integers(0, 5000)) for c in raw["ids"]["columns"]},
            "numbers": {c: float(rng.random() * 10) for c in raw["numbers"]["columns"]},
            "recent": {
                **{c: [int(v) for v in rng.integers(0, 5000, views)] for c in raw["recent"]["ids"]},
                **{c: [float(v) for v in rng.random(views)] for c in raw["recent"]["outcomes"]},
            },
            "dense": {f: 0.0 for f in raw["dense"]["features"]},
            "sparse": {f: [1] for f in raw["sparse"]["features"]},
        }
        for _ in range(count)
    ]


def _program_scores(export, spec, rows):
    program = torch.export.load(str(export / "model_raw_fp32.pt2")).module()
    with torch.no_grad():
        return program(*rows_to_inputs(rows, spec["raw"])).numpy()


def test_concurrent_requests_are_batched_and_scored_as_the_raw_program_scores_them(service):
    """Two requests at once, with histories of different lengths, share a batch (the second
    arrives within the first's 0.4 s): each gets its own rows' scores, those of the torch.export
    program (which the served AOTInductor package was compiled from)."""
    url, spec, export = service
    requests = [_rows(spec, 3, seed=0, views=5), _rows(spec, 4, seed=1, views=0)]
    replies = [None, None]

    def send(i):
        replies[i] = _post(url, {"rows": requests[i]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 2.0
    version = replies[0][1]["model_version"]
    for _, reply in replies:
        assert reply["batch_rows"] == 7 and reply["program"] == "aoti"  # one batch of both; compiled
    for (status, reply), rows in zip(replies, requests, strict=True):
        assert (
            status == 200 and reply["model_version"] == version and reply["tasks"] == ["watch_ratio", "skip"]
        )
        np.testing.assert_allclose(
            np.array(reply["predictions"]), _program_scores(export, spec, rows), atol=1e-6
        )
    assert version.startswith("best-step-")


def test_each_bad_request_gets_a_4xx_naming_the_field_and_the_service_keeps_serving(service):
    url, spec, _ = service
    good = _rows(spec, 1, seed=2, views=2)[0]
    column = spec["raw"]["numbers"]["columns"][0]
    id_column = spec["raw"]["ids"]["columns"][0]

    def changed(part, key, value):
        row = json.loads(json.dumps(good))
        if value is None and key in row[part]:
            del row[part][key]
        else:
            row[part][key] = value
        return {"rows": [row]}

    cases = [
        (changed("ids", id_column, None), 422, f"rows[0].ids.{id_column}: missing"),
        (changed("numbers", column, "7"), 422, f"rows[0].numbers.{column}: expected a number or null"),
        (changed("ids", id_column, 1.5), 422, f"rows[0].ids.{id_column}: expected an integer"),
        (changed("numbers", "no_such_column", 1.0), 422, "rows[0].numbers.no_such_column: unknown feature"),
        ({"rows": []}, 422, "rows: expected a list of one row or more"),
        ({"rows": [good] * 51}, 413, "rows: 51 rows, more than the 50"),
        ({"rows": [good], "extra": 1}, 422, 'body: expected {"rows"'),
        (changed("ids", id_column, 2**70), 422, f"rows[0].ids.{id_column}: expected a 64-bit integer"),
        (changed("numbers", column, 10**400), 422, f"rows[0].numbers.{column}: expected a finite number"),
    ]
    sparse = spec["raw"]["sparse"]["features"]
    if sparse:  # an id past the table's last row would fail the whole batch in the worker
        largest = spec["raw"]["sparse"]["max_id"][sparse[0]]
        cases.append(
            (changed("sparse", sparse[0], [1, largest + 1]), 422, f"rows[0].sparse.{sparse[0]}: ids lie in")
        )
    for body, status, message in cases:
        code, reply = _post(url, body)
        assert (code, reply["error"][: len(message)]) == (status, message), reply
        assert reply["model_version"]
    for raw in (b"this is not json", b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        code, reply = _post(url, raw=raw)  # the second nests past Python's recursion limit
        assert code == 400 and reply["error"].startswith("body: not JSON"), reply
    # past 50 rows' bytes: refused by its declared length, before any of the body is sent
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "2000000")
    connection.endheaders()
    answer = connection.getresponse()
    reply = json.loads(answer.read())
    connection.close()
    assert answer.status == 413 and reply["error"].startswith("body: 2000000 bytes, more than")
    for constant, shown in (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")):
        text = json.dumps(changed("numbers", column, 12345.5)).replace("12345.5", constant)
        code, reply = _post(url, raw=text.encode())
        assert (code, reply["error"]) == (
            422,
            f"rows[0].numbers.{column}: expected a finite number, got {shown}",
        )
    code, reply = _post(url, {"rows": [good]})  # still serving
    assert code == 200 and len(reply["predictions"]) == 1


def test_past_its_requests_in_flight_the_service_sheds_with_503_and_recovers(service):
    """Two requests wait in their batch window (0.4 s); a third, sent meanwhile, is shed at once
    rather than queued; afterwards the service answers again."""
    url, spec, _ = service
    rows = _rows(spec, 1, seed=3, views=1)
    replies = []

    def send():
        replies.append(_post(url, {"rows": rows}))

    waiting = [threading.Thread(target=send) for _ in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(0.15)
    started = time.monotonic()
    code, reply = _post(url, {"rows": rows})
    shed_in = time.monotonic() - started
    for thread in waiting:
        thread.join()
    assert code == 503 and "overloaded" in reply["error"] and shed_in < 0.3
    assert sorted(status for status, _ in replies) == [200, 200]
    assert _post(url, {"rows": rows})[0] == 200
