"""engagerec export: one unsharded torch.export program per run that predicts what the sharded
model predicts, loads without engagerec or torchrec, and states its int8 quality."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engagerec.cli import main
from engagerec.data.schema import DatasetSchema
from engagerec.export import export_run
from engagerec.predict import predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(kuairand_run, tmp_path_factory):
    run, data_dir = kuairand_run
    out = tmp_path_factory.mktemp("export")
    return export_run(run, out, int8=True), out


@pytest.fixture(scope="module")
def eager(kuairand_run, tmp_path_factory):
    """engagerec.predict's scores of the test split (the sharded model), in the split's row order."""
    run, data_dir = kuairand_run
    out = tmp_path_factory.mktemp("eager") / "eager.parquet"
    return pq.read_table(predict(run, data_dir, out)["out"]).to_pandas()


def _client_code():
    """The client in docs/SERVING.md, as the document shows it."""
    text = (REPO / "docs" / "SERVING.md").read_text()
    return re.search(r"## A client of encoded rows.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_fp32_program_predicts_what_the_sharded_model_predicts(kuairand_run, exported, eager):
    run, data_dir = kuairand_run
    record, out = exported
    assert record["max_abs_difference_fp32_vs_eager"] < 1e-5
    program = torch.export.load(str(out / "model_fp32.pt2")).module()
    from engagerec.data.reader import ShardReader, make_loader
    from engagerec.export import serving_inputs

    names = json.loads((out / "inputs.json").read_text())["sparse"]["features"]
    scored = []
    with torch.no_grad():
        for batch in make_loader(ShardReader(data_dir, "test", batch_size=3000, rank=0, world_size=1)):
            scored.append(program(*serving_inputs(batch, names)).numpy())
    scored = np.concatenate(scored)
    np.testing.assert_allclose(scored[:, 0], eager["watch_ratio"], atol=1e-5)
    np.testing.assert_allclose(scored[:, 1], eager["skip_probability"], atol=1e-5)
    fp32 = record["programs"]["fp32"]["test"]
    assert fp32["rows"] == len(eager)
    assert fp32["watch_ratio/mse"] == pytest.approx(
        float(
            (
                (eager["watch_ratio"] - pq.read_table(data_dir / "test").column("watch_ratio").to_numpy())
                ** 2
            ).mean()
        ),
        rel=1e-5,
    )


def test_int8_tables_are_smaller_and_their_quality_loss_is_stated(exported, kuairand_run):
    record, out = exported
    fp32, int8 = record["programs"]["fp32"], record["programs"]["int8"]
    # a width-d row: 4d bytes in fp32; d int8 codes plus an fp32 scale and offset in int8
    schema = DatasetSchema.load(kuairand_run[1])
    rows = sum(schema.num_embeddings(space) for space in {f.id_space for f in schema.sparse})
    assert int8["table_bytes"] == fp32["table_bytes"] // 4 + 8 * rows
    assert int8["table_bytes"] <= 0.5 * fp32["table_bytes"]  # widths >= 8
    assert (out / "model_int8.pt2").stat().st_size == int8["bytes"]
    assert abs(int8["test"]["watch_ratio/mse"] - fp32["test"]["watch_ratio/mse"]) < 1e-3
    assert abs(int8["test"]["skip/auc"] - fp32["test"]["skip/auc"]) < 2e-3
    assert json.loads((out / "export.json").read_text())["programs"]["int8"] == int8


@pytest.mark.slow
def test_the_documented_client_runs_without_engagerec_or_torchrec(kuairand_run, exported, eager, tmp_path):
    """The client, as documented, predicts what engagerec.predict predicts, row by row: a wrong
    offset or feature order in it (or in inputs.json) would move the scores."""
    _, data_dir = kuairand_run
    _, out = exported
    blocked = (
        "import sys\nfor name in ('engagerec', 'torchrec', 'fbgemm_gpu'):\n    sys.modules[name] = None\n"
    )
    shard = data_dir / "test" / "part-00000.parquet"
    saved = "\nnp.save(os.environ['SCORES'], predictions.detach().numpy())\n"  # after the client, unchanged
    env = {**os.environ, "EXPORT_DIR": str(out), "SHARD": str(shard), "SCORES": str(tmp_path / "scores.npy")}
    done = subprocess.run(
        [sys.executable, "-c", blocked + _client_code() + saved],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = eval(done.stdout.strip().splitlines()[-1])  # the client's last line: a dict of lists
    scores = np.load(tmp_path / "scores.npy")
    # the client scores the first 1,000 rows of the split's first shard: predict's first rows
    assert sorted(p.name for p in shard.parent.glob("*.parquet"))[0] == shard.name
    assert len(scores) == min(1000, pq.ParquetFile(shard).metadata.num_rows) == 1000
    np.testing.assert_allclose(scores[:, 0], eager["watch_ratio"][:1000], rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores[:, 1], eager["skip_probability"][:1000], rtol=0, atol=1e-5)
    assert printed == {"watch_ratio": scores[:3, 0].tolist(), "skip": scores[:3, 1].tolist()}


def test_the_export_carries_the_encoding_a_client_needs(kuairand_run, exported):
    record, out = exported
    _, data_dir = kuairand_run
    schema = DatasetSchema.load(out / "encoding")  # loads as the training data's schema
    assert schema.dense_names == DatasetSchema.load(data_dir).dense_names
    assert schema.target_stats and "schema.json" in record["encoding"]
    for space, size in schema.vocab_sizes.items():  # every vocabulary, whole
        if (data_dir / "vocabs" / f"{space}.parquet").exists():
            assert pq.read_table(out / "encoding" / "vocabs" / f"{space}.parquet").num_rows == size
    assert {f"stats/{name}.parquet" for name in schema.target_stats} <= set(record["encoding"])
    assert "encoding/" in json.loads((out / "inputs.json").read_text())["encoding"]


def test_export_command_prints_the_programs_and_refuses_a_non_run(kuairand_run, tmp_path, capsys):
    run, _ = kuairand_run
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "e"), "--check-rows", "2000"]) == 0
    said = capsys.readouterr().out
    assert re.search(
        r"model_fp32.pt2 .* MiB .* test \(\d[\d,]* rows\): watch_ratio/mse 0\.\d+, skip/auc 0\.\d+", said
    )
    assert "largest difference" in said and not (tmp_path / "e" / "model_int8.pt2").exists()
    assert main(["export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is no run directory" in capsys.readouterr().err
