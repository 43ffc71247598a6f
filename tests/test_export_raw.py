"""engagerec export's raw program (model_raw_fp32.pt2): raw values in, prepare's encoding inside
the graph. From the same raw rows it scores what `engagerec predict` scores, on the bundled
config and on one with every feature kind; inputs.json says which inputs stay encoded, and a
client with torch alone runs it."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import built_once
from engagerec.config import FeatureConfig, load_config
from engagerec.data.adapters import load_tables
from engagerec.data.events import build_scoring_events
from engagerec.data.raw import TIMESTAMP, USER_ID, WATCH_TIME
from engagerec.data.scoring import encode_for_scoring, scoring_source
from engagerec.data.tables import connect
from engagerec.export import export_run
from engagerec.predict import predict
from engagerec.raw_inputs import MISSING_ID
from engagerec.runs import run_config

# the runs name the bundled users and content tables relative to the repository
pytestmark = pytest.mark.usefixtures("in_repo")

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "datasets" / "kuairand" / "processed_standard_kcore_15.csv"
USERS_TABLE = REPO / "datasets" / "kuairand" / "user_features_pure.csv"
USERS = 40  # users whose every view is scored: each row's history comes from the user's earlier rows
# beyond the bundled config: a positional history, a hashed id space and an id statistic over
# text tokens (both left to the client), numbers with buckets but no transform, a history_mean
# with log1p and buckets, an id statistic with buckets
EVERY_KIND = [
    FeatureConfig("recent_authors", kind="history", of="author_id", length=3, positions=True),
    FeatureConfig("author_hashed", column="author_id", id_space="author_hashed", hash_buckets=64),
    FeatureConfig("degree_mean_skip", kind="target_mean", column="user_active_degree", of="skip"),
    FeatureConfig("hour_number", kind="numeric", column="hour", buckets=4, missing="mean"),
    FeatureConfig("recent_skip_log", kind="history_mean", of="skip", length=3, transform="log1p", buckets=3),
    FeatureConfig("video_views_bucketed", kind="id_count", column="content_id", buckets=4),
]


@pytest.fixture(scope="module")
def every_kind_run(tmp_path_factory):
    """One epoch of configs/kuairand_random.yaml with EVERY_KIND's features added: (run, data)."""
    from engagerec.data.prepare import prepare
    from engagerec.train import train

    cfg = load_config(REPO / "configs" / "kuairand_random.yaml")

    def build(out):
        data = dataclasses.replace(cfg.data, features=cfg.data.features + EVERY_KIND)
        changes = {"data_dir": str(out / "data"), "epochs": 1, "progress_bar": False, "device": "cpu"}
        every = dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, **changes))
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(REPO)
            prepare(every.data, out / "data")
            train(every, out / "run")

    out = built_once(tmp_path_factory, "every_kind_run", build)
    return out / "run", out / "data"


@pytest.fixture(scope="module")
def log_rows(tmp_path_factory):
    """Every view of USERS users of the bundled log, 30 of them of videos nobody has seen and 20
    without an hour, and the users table with some of those users' numbers missing: (log, users)."""
    log = pd.read_csv(LOG, sep="\t")
    users = sorted(log["user_id"].unique())[::25][:USERS]
    rows = log[log["user_id"].isin(users)].reset_index(drop=True)
    rows.loc[rows.index[::50][:30], "video_id"] = 10**12 + np.arange(30)
    rows["hourmin"] = rows["hourmin"].astype("Int64")
    rows.loc[rows.index[7::60][:20], "hourmin"] = pd.NA
    folder = tmp_path_factory.mktemp("log")
    rows.to_csv(folder / "log.csv", sep="\t", index=False)
    table = pd.read_csv(USERS_TABLE)
    blank = table["user_id"].isin(users[::4])
    table["follow_user_num"] = table["follow_user_num"].astype("float64").mask(blank)
    table["register_days"] = table["register_days"].astype("float64").mask(blank)
    table.to_csv(folder / "users.csv", index=False)
    return folder / "log.csv", folder / "users.csv"


def _joined(run, log_path, users, work):
    """The rows as predict joins them (the log with the users and content tables), in input
    order: the raw values a client holds for each row."""
    cfg = run_config(run).data
    source = scoring_source(cfg, str(log_path), str(users), None)
    con = connect(work, cfg.memory_limit, cfg.threads)
    raw = load_tables(source, work)
    log = dataclasses.replace(
        raw.interactions, required=tuple(c for c in raw.interactions.required if c != WATCH_TIME)
    )
    build_scoring_events(
        con, dataclasses.replace(raw, interactions=log), dataclasses.replace(cfg, source=source)
    )
    joined = con.execute("SELECT * FROM events ORDER BY __src").df()
    con.close()
    return joined


def _as_ids(values: pd.Series) -> np.ndarray:
    """Raw ids as int64, MISSING_ID where missing or not an integer (as prepare reads them)."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    whole = np.isfinite(numbers) & (numbers == np.floor(numbers))
    ids = np.full(len(numbers), MISSING_ID, dtype=np.int64)
    if values.dtype.kind in "iu":  # integers (<NA> missing): exact, whatever their size
        return values.astype("Int64").fillna(MISSING_ID).to_numpy(np.int64)
    ids[whole] = numbers[whole].astype(np.int64)
    return ids


def raw_inputs(spec, joined, encoded, recent=200):
    """The raw program's inputs for the joined rows: ids and numbers from each row, each row's
    last ``recent`` earlier views (same user, strictly earlier timestamp, in log order) from the
    rows before it, and the client-encoded features from predict's encoder (``encoded``)."""
    ids = {c: torch.from_numpy(_as_ids(joined[c])) for c in spec["ids"]["columns"]}
    numbers = {
        c: torch.from_numpy(pd.to_numeric(joined[c], errors="coerce").astype("float64").to_numpy())
        for c in spec["numbers"]["columns"]
    }
    views = {c: _as_ids(joined[c]) for c in spec["recent"]["ids"]}
    views |= {c: joined[c].astype("float64").to_numpy() for c in spec["recent"]["outcomes"]}
    windows = {c: np.zeros((len(joined), recent), dtype=v.dtype) for c, v in views.items()}
    lengths = np.zeros(len(joined), dtype=np.int64)
    for _, user in joined.sort_values([TIMESTAMP, "__src"]).groupby(USER_ID, sort=False):
        order, times = user.index.to_numpy(), user[TIMESTAMP].to_numpy()
        for i, row in enumerate(order):
            earlier = order[: np.searchsorted(times, times[i], side="left")][-recent:]
            lengths[row] = len(earlier)
            for c, values in views.items():
                windows[c][row, : len(earlier)] = values[earlier]
    sparse_ids, offsets = {}, {}
    for name in spec["sparse"]["features"]:
        column = encoded[name]
        bags = [np.atleast_1d(np.asarray(v, dtype=np.int64)) for v in column]
        sparse_ids[name] = torch.from_numpy(np.concatenate(bags) if bags else np.zeros(0, np.int64))
        sizes = np.array([len(b) for b in bags])
        offsets[name] = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    dense = {name: torch.from_numpy(encoded[name].to_numpy(np.float32)) for name in spec["dense"]["features"]}
    recent_views = {c: torch.from_numpy(w) for c, w in windows.items()}
    return ids, numbers, recent_views, torch.from_numpy(lengths), dense, sparse_ids, offsets


@pytest.fixture(scope="module", params=["bundled", "every_kind"])
def scored(request, kuairand_run, log_rows, tmp_path_factory):
    """(export directory, its inputs.json, the raw program's inputs, predict's scores, the raw
    program's scores) for the log rows, with the bundled run or the every-kind run."""
    run = kuairand_run[0] if request.param == "bundled" else request.getfixturevalue("every_kind_run")[0]
    work = tmp_path_factory.mktemp(request.param)
    record = export_run(run, work / "export", check_rows=2000)
    spec = json.loads((work / "export" / "inputs.json").read_text())
    cfg = run_config(run)
    log, users = log_rows
    encode_for_scoring(
        cfg.data, cfg.train.data_dir, str(log), work / "encoded", users=str(users)
    )  # the client's part
    encoded = pq.read_table(work / "encoded" / "test").to_pandas()
    joined = _joined(run, log, users, work / "joined")
    inputs = raw_inputs(spec["raw"], joined, encoded)
    program = torch.export.load(str(work / "export" / "model_raw_fp32.pt2")).module()
    with torch.no_grad():
        raw = program(*inputs).numpy()
    expected = pq.read_table(predict(run, log, work / "predict.parquet", users=str(users))["out"]).to_pandas()
    assert (expected["row"].to_numpy() == joined["__src"].to_numpy()).all()
    return work / "export", spec, inputs, expected, raw, record


def test_the_raw_program_scores_what_predict_scores_from_the_same_raw_rows(scored):
    _, spec, inputs, expected, raw, record = scored
    assert len(expected) > 1000 and record["raw_programs"]["fp32"]["max_abs_difference_vs_module"] == 0
    difference = np.abs(raw - expected[["watch_ratio", "skip_probability"]].to_numpy()).max()
    print(f"raw program vs predict: max abs difference {difference:.2e} over {len(expected)} rows")
    assert difference < 1e-6
    # the rows exercise what the encoding inside must get right
    ids, numbers, recent, lengths = inputs[:4]
    assert (ids["content_id"] >= 10**12).sum() == 30  # videos nobody has seen: the OOV row
    assert (ids["is_live_streamer"] == MISSING_ID).any()  # missing ids (KuaiRand's -124)
    assert (ids["hour"] == MISSING_ID).sum() == 20
    assert torch.isnan(numbers["follow_user_num"]).any()  # missing numbers, filled
    assert (lengths == 0).any() and (lengths > 20).any()  # first views and long histories


def test_a_wrong_encoding_inside_would_move_the_scores(scored):
    """The comparison above sees each part of the raw inputs: shifting one raw id, number or
    earlier outcome moves the scores far past its tolerance."""
    export, spec, inputs, expected, raw, _ = scored
    program = torch.export.load(str(export / "model_raw_fp32.pt2")).module()
    ids, numbers, recent, lengths, *rest = inputs
    changed = [
        ({**ids, "content_id": ids["content_id"] + 1}, numbers, recent, lengths),
        (ids, {**numbers, "duration": numbers["duration"] * 2}, recent, lengths),
        (ids, numbers, {**recent, "watch_ratio": 1 - recent["watch_ratio"]}, lengths),
        (ids, numbers, recent, (lengths - 1).clamp(min=0)),
    ]
    with torch.no_grad():
        for args in changed:
            assert np.abs(program(*args, *rest).numpy() - raw).max() > 1e-4


def test_inputs_json_says_which_features_are_raw_and_which_the_client_encodes(scored):
    export, spec, *_ = scored
    features = spec["raw"]["features"]
    schema = json.loads((export / "encoding" / "schema.json").read_text())
    assert set(features) == {f["name"] for f in schema["sparse"]} | {d["name"] for d in schema["dense"]}
    raw = {name for name, f in features.items() if f["input"] == "raw"}
    encoded = {name for name, f in features.items() if f["input"] == "encoded"}
    assert encoded == set(spec["raw"]["sparse"]["features"]) | set(spec["raw"]["dense"]["features"])
    assert {"genres"} <= encoded and "text" in features["genres"]["why"]  # multi-hot text tokens
    assert {"user_active_degree", "video_type"} <= encoded  # id spaces of strings
    assert {"user_id", "content_id", "history", "duration", "duration_bucket", "recent_skip_rate"} <= raw
    assert {"user_views", "video_mean_skip", "author_mean_watch_ratio"} <= raw  # integer-keyed statistics
    assert "content_id" in spec["raw"]["recent"]["ids"]
    assert {"watch_ratio", "skip"} == set(spec["raw"]["recent"]["outcomes"])
    assert spec["raw"]["recent"]["views_needed"] == 200  # longer_watch_ratio: the last 200 views
    assert spec["raw"]["programs"] == ["model_raw_fp32.pt2"]  # this export's, never an earlier one's
    if "author_hashed" in features:  # the every-kind config
        assert "hash()" in features["author_hashed"]["why"]
        assert features["degree_mean_skip"] == {**features["degree_mean_skip"], "input": "encoded"}
        for name in (
            "recent_authors@0",
            "hour_number_bucket",
            "recent_skip_log_bucket",
            "video_views_bucketed",
        ):
            assert features[name]["input"] == "raw", name
        assert "author_id" in spec["raw"]["recent"]["ids"]


def _client_code():
    """The raw-values client in docs/SERVING.md, as the document shows it."""
    text = (REPO / "docs" / "SERVING.md").read_text()
    return re.search(r"## A client of raw values.*?```python\n(.*?)```", text, re.S).group(1)


def _json_rows(spec, inputs, rows):
    """The first ``rows`` rows of the raw inputs as the documented client's JSON lines."""
    ids, numbers, recent, lengths, dense, sparse_ids, offsets = inputs
    lines = []
    for r in range(rows):
        views = int(lengths[r])
        sparse = {}
        for name, values in sparse_ids.items():
            end = int(offsets[name][r + 1]) if r + 1 < len(offsets[name]) else len(values)
            sparse[name] = values[int(offsets[name][r]) : end].tolist()
        row = {
            "ids": {c: (None if int(v[r]) == MISSING_ID else int(v[r])) for c, v in ids.items()},
            "numbers": {c: (None if torch.isnan(v[r]) else float(v[r])) for c, v in numbers.items()},
            "recent": {
                c: [None if isinstance(x, float) and np.isnan(x) else x for x in v[r, :views].tolist()]
                for c, v in recent.items()
            },
            "dense": {name: float(v[r]) for name, v in dense.items()},
            "sparse": sparse,
        }
        lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def test_the_documented_raw_client_runs_with_torch_alone(scored, tmp_path):
    """The client in docs/SERVING.md, with engagerec, torchrec and fbgemm-gpu unimportable, scores
    JSON rows of raw values as predict scored them."""
    export, spec, inputs, expected, _, _ = scored
    rows = 300
    (tmp_path / "rows.jsonl").write_text(_json_rows(spec["raw"], inputs, rows))
    blocked = (
        "import sys\nfor name in ('engagerec', 'torchrec', 'fbgemm_gpu'):\n    sys.modules[name] = None\n"
    )
    saved = "\nnp.save(os.environ['SCORES'], predictions.numpy())\n"
    env = {**os.environ, "EXPORT_DIR": str(export), "ROWS": str(tmp_path / "rows.jsonl")}
    env["SCORES"] = str(tmp_path / "scores.npy")
    done = subprocess.run(
        [sys.executable, "-c", blocked + _client_code() + saved],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(
        scores, expected[["watch_ratio", "skip_probability"]].to_numpy()[:rows], rtol=0, atol=1e-6
    )


def test_predicts_encoder_runs_on_its_own_for_the_inputs_left_to_the_client(kuairand_run, log_rows, tmp_path):
    """engagerec.data.scoring encodes the client's part with neither torch nor torchrec importable."""
    run, data_dir = kuairand_run
    code = (
        "import json, sys\nfor name in ('torch', 'torchrec', 'fbgemm_gpu'):\n    sys.modules[name] = None\n"
        "from engagerec.config import config_from_dict\n"
        "from engagerec.data.scoring import encode_for_scoring\n"
        f"cfg = config_from_dict(json.load(open({str(run / 'config.json')!r})), check=False)\n"
        f"out = {str(tmp_path / 'e')!r}\n"
        f"print(encode_for_scoring(cfg.data, {str(data_dir)!r}, {str(log_rows[0])!r}, out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "plugin")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    encoded = pq.read_table(tmp_path / "e" / "test").to_pandas()
    assert {"genres", "user_active_degree"} <= set(encoded.columns) and len(encoded) > 1000


def test_a_negative_number_of_a_log1p_feature_scores_nan_never_a_guess(tmp_path):
    """predict refuses x < 0 for log1p; the program cannot raise per row, so the row's input is
    NaN (and with it the score), even where the feature fills missing values with the mean."""
    from engagerec.data.schema import DatasetSchema, DenseFeature, LabelSpec
    from engagerec.raw_inputs import RawEncoder

    schema = DatasetSchema(
        features=[{"name": "followers", "kind": "numeric", "transform": "log1p", "missing": "mean"}],
        sparse=[],
        dense=[DenseFeature("followers", "followers", "log1p", 2.0, 1.0, 2.0)],
        labels=[LabelSpec("skip", "binary")],
        vocab_sizes={},
    )
    encoder = RawEncoder(schema, tmp_path, [])
    values = torch.tensor([np.e - 1, float("nan"), -0.5, -3.0], dtype=torch.float64)
    dense, _, _ = encoder({}, {"followers": values}, {}, torch.zeros(4, dtype=torch.int64), {}, {}, {})
    assert dense[:2, 0].tolist() == pytest.approx([-1.0, 0.0])  # ln(e) = 1 standardised; missing: the mean
    assert torch.isnan(dense[2:, 0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("scored", ["bundled"], indirect=True)
def test_the_aoti_package_scores_from_cpp_what_predict_scores(scored, tmp_path):
    """``export --aoti``'s package, run by the C++ client (``make cpp-client``, g++ against the
    wheel's libtorch) on the raw rows' tensors in inputs.json's flat order, scores what
    `engagerec predict` scores, to 1e-5; so does Python's loader."""
    from engagerec.aoti import compile_package, flat_inputs, package_name, usable_package

    export, _, inputs, expected, raw, _ = scored
    record = compile_package(export)
    assert record["max_abs_difference_vs_program"] < 1e-5
    assert usable_package(export) == export / package_name()  # compiled from this program, for this CPU
    spec = json.loads((export / "inputs.json").read_text())["raw"]["aoti"]
    assert spec["package"] == package_name() and len(spec["inputs"]) == sum(
        len(part) if isinstance(part, dict) else 1 for part in inputs
    )
    built = subprocess.run(["make", "-s", "cpp-client"], cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    torch.save(flat_inputs(inputs, spec["inputs"]), tmp_path / "inputs.pt")
    client = [str(REPO / "build" / "cpp" / "score_raw"), str(export / spec["package"])]
    done = subprocess.run(
        [*client, str(tmp_path / "inputs.pt"), str(tmp_path / "scores.pt")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from_cpp = torch.load(tmp_path / "scores.pt").numpy()
    truth = expected[["watch_ratio", "skip_probability"]].to_numpy()
    difference = np.abs(from_cpp - truth).max()
    print(f"C++ client vs predict: max abs difference {difference:.2e} over {len(truth)} rows")
    assert from_cpp.shape == truth.shape and difference < 1e-5
    assert np.abs(from_cpp - raw).max() < 1e-5  # and the Python program's
    with torch.no_grad():
        in_python = torch._inductor.aoti_load_package(str(export / spec["package"]))(*inputs).numpy()
    assert np.abs(in_python - truth).max() < 1e-5
    # a wrong order of inputs is no silent success: swapped id columns move the scores
    swapped = flat_inputs(inputs, spec["inputs"])
    first, second = [i for i, entry in enumerate(spec["inputs"]) if entry["argument"] == "ids"][:2]
    swapped[first], swapped[second] = swapped[second], swapped[first]
    torch.save(swapped, tmp_path / "swapped.pt")
    subprocess.run([*client, str(tmp_path / "swapped.pt"), str(tmp_path / "swapped_scores.pt")], check=True)
    assert np.abs(torch.load(tmp_path / "swapped_scores.pt").numpy() - truth).max() > 1e-3
    # a package that no longer matches its program (the program exported again) is not served
    inputs_file = export / "inputs.json"
    kept = inputs_file.read_text()
    changed = json.loads(kept)
    changed["raw"]["aoti"]["source_crc32"] = "00000000"
    inputs_file.write_text(json.dumps(changed))
    assert usable_package(export) is None
    inputs_file.write_text(kept)
