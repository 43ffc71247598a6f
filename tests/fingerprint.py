"""A fingerprint of a prepared dataset, to prove two writers give the same answers.

Per split: the row count and a sha256 of the rows' exact columns (sparse ids, id lists and
labels), sorted so that on-disk order does not matter; a sha256 of every vocabulary and the
bucket boundaries. Dense values are compared row by row, not hashed: float32 standardisation
may differ in the last bit between engines, so a hash of rounded values would flip at rounding
boundaries. ``dense_rows`` lists them in the exact columns' order and ``assert_same_dense``
allows each value ``atol`` (1e-5), so one row's drift fails. (The fingerprint's per-column
dense sums are kept for the record; a sum hides one row's drift, so they are not compared.)

    python tests/fingerprint.py prepared/kuairand_temporal > fingerprint.json
    python tests/fingerprint.py prepared/kuairand_temporal --dense dense.npz  # the per-row golden
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _exact_rows(table: pa.Table, exact: list) -> List[tuple]:
    """Each row's exact columns as a sortable tuple (id lists as tuples)."""
    columns = {name: table.column(name).to_pylist() for name in exact}
    return [
        tuple(tuple(v) if isinstance(v, list) else v for v in (columns[n][i] for n in exact))
        for i in range(table.num_rows)
    ]


def _exact_columns(schema: Dict[str, Any]) -> List[str]:
    return [s["name"] for s in schema["sparse"]] + [label["name"] for label in schema["labels"]]


def split_fingerprint(table: pa.Table, dense: list, exact: list) -> Dict[str, Any]:
    rows = _exact_rows(table, exact)
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    key = np.array([hash(rows[i]) % 1009 for i in range(len(rows))], dtype=np.float64)  # per-row weight
    out: Dict[str, Any] = {"rows": table.num_rows, "exact_sha256": _sha([rows[i] for i in order])}
    for name in dense:
        values = table.column(name).to_numpy().astype(np.float64)
        out[f"dense:{name}"] = [float(values.sum()), float((values * key).sum())]
    return out


def fingerprint(directory: str | Path) -> Dict[str, Any]:
    directory = Path(directory)
    schema = json.loads((directory / "schema.json").read_text())
    dense = [d["name"] for d in schema["dense"]]
    exact = _exact_columns(schema)
    if "vocabs" in schema:  # schema version 1 kept the vocabularies inline
        vocabs = schema["vocabs"]
    else:
        vocabs = {
            path.stem: pq.read_table(path).column("token").to_pylist()
            for path in (directory / "vocabs").glob("*")
        }
    buckets = schema.get("buckets", {})
    out: Dict[str, Any] = {
        # bucket ids are 0..len(boundaries)+1 by construction: the boundaries say everything
        "vocabs_sha256": {space: _sha(tokens) for space, tokens in vocabs.items() if space not in buckets},
        "buckets": buckets,
    }
    for split in ("train", "val", "test"):
        out[split] = split_fingerprint(pq.read_table(directory / split), dense, exact)
    return out


def assert_same(got: Dict[str, Any], want: Dict[str, Any]) -> None:
    """Exact parts equal: vocabularies, bucket boundaries (to 1e-12), rows and exact columns per
    split. Dense values are ``assert_same_dense``'s."""
    buckets = set(want["buckets"])
    assert got["vocabs_sha256"] == {k: v for k, v in want["vocabs_sha256"].items() if k not in buckets}
    assert got["buckets"].keys() == want["buckets"].keys()
    for name, edges in want["buckets"].items():
        assert np.allclose(got["buckets"][name], edges, rtol=1e-12), name
    for split in ("train", "val", "test"):
        g, w = got[split], want[split]
        assert g["rows"] == w["rows"], split
        assert g["exact_sha256"] == w["exact_sha256"], split


def dense_rows(directory: str | Path, names: List[str]) -> Dict[str, np.ndarray]:
    """
    Per split, the dense columns ``names`` as float32 ``[rows, len(names)]``, rows in the order of
    their exact columns (as ``split_fingerprint`` sorts them), so the order is the writer's answer
    and not its row layout. Rows equal in every exact column (a few hundred of 34k in the bundled
    data) have each dense column sorted within their group: which row comes first there must not
    hang on a value's last bit.

    Args:
        directory: a prepared data directory.
        names: the dense columns to list.

    Returns:
        Dict[str, np.ndarray]: ``train``, ``val`` and ``test``.
    """
    directory = Path(directory)
    exact = _exact_columns(json.loads((directory / "schema.json").read_text()))
    out = {}
    for split in ("train", "val", "test"):
        table = pq.read_table(directory / split)
        rows = _exact_rows(table, exact)
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        values = np.stack([table.column(n).to_numpy().astype(np.float32) for n in names], 1)[order]
        start = 0
        for i in range(1, len(order) + 1):  # each run of equal exact rows: its columns sorted
            if i == len(order) or rows[order[i]] != rows[order[start]]:
                if i - start > 1:
                    values[start:i] = np.sort(values[start:i], axis=0)
                start = i
        out[split] = values
    return out


def save_dense(directory: str | Path, path: str | Path) -> None:
    """``dense_rows`` of every dense column of ``directory``, with their names, as a compressed .npz."""
    schema = json.loads((Path(directory) / "schema.json").read_text())
    names = [d["name"] for d in schema["dense"]]
    np.savez_compressed(path, columns=np.array(names), **dense_rows(directory, names))


def assert_same_dense(directory: str | Path, golden: str | Path, atol: float = 1e-5) -> None:
    """Every dense value of ``golden``'s columns (a ``save_dense`` file) within ``atol`` of
    ``directory``'s, row by row; the message names the split, the column and the worst row."""
    with np.load(golden) as want:
        names = [str(n) for n in want["columns"]]
        got = dense_rows(directory, names)
        for split in ("train", "val", "test"):
            assert got[split].shape == want[split].shape, split
            error = np.abs(got[split].astype(np.float64) - want[split])
            worst = np.unravel_index(int(error.argmax()), error.shape)
            assert error[worst] <= atol, (split, names[worst[1]], f"row {worst[0]}", float(error[worst]))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--dense":
        save_dense(sys.argv[1], sys.argv[3])
    else:
        print(json.dumps(fingerprint(sys.argv[1]), indent=1))
