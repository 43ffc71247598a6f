"""A compact fingerprint of a prepared dataset, to prove two writers give the same answers.

Per split: the row count; a sha256 of the rows' exact columns (sparse ids, id lists and
labels), sorted so that on-disk order does not matter; and, for each dense column, its sum
and its sum weighted by a per-row key, compared with a tolerance (float32 standardisation
may differ in the last bit between engines). Plus a sha256 of every vocabulary and the
bucket boundaries.

    python tests/fingerprint.py prepared/kuairand_temporal > fingerprint.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def split_fingerprint(table: pa.Table, dense: list, exact: list) -> Dict[str, Any]:
    rows = []
    columns = {name: table.column(name).to_pylist() for name in exact}
    for i in range(table.num_rows):
        rows.append(tuple(tuple(v) if isinstance(v, list) else v for v in (columns[n][i] for n in exact)))
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
    exact = [s["name"] for s in schema["sparse"]] + [label["name"] for label in schema["labels"]]
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


def assert_same(got: Dict[str, Any], want: Dict[str, Any], rel: float = 1e-5) -> None:
    """Exact parts equal; dense checksums within ``rel`` (relative to the column's scale)."""
    buckets = set(want["buckets"])
    assert got["vocabs_sha256"] == {k: v for k, v in want["vocabs_sha256"].items() if k not in buckets}
    assert got["buckets"].keys() == want["buckets"].keys()
    for name, edges in want["buckets"].items():
        assert np.allclose(got["buckets"][name], edges, rtol=1e-12), name
    for split in ("train", "val", "test"):
        g, w = got[split], want[split]
        assert g["rows"] == w["rows"], split
        assert g["exact_sha256"] == w["exact_sha256"], split
        for name, value in w.items():
            if name.startswith("dense:"):
                total, weighted = value
                scale = max(1.0, g["rows"])
                assert abs(g[name][0] - total) <= rel * scale * 1009, (split, name)
                assert abs(g[name][1] - weighted) <= rel * scale * 1009, (split, name)


if __name__ == "__main__":
    print(json.dumps(fingerprint(sys.argv[1]), indent=1))
