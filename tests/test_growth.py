"""Preparing the next window of a log against an earlier preparation (``prepare --base``): known
ids keep their rows, new ids are appended, the base's normalisation stays, id statistics and
histories carry on from the base, and a base the window cannot continue is refused."""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import study_config, study_files
from engagerec.config import config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.growth import TAIL_FILE
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader
from engagerec.data.schema import DatasetSchema

SMOOTHING = 2.0
FEATURES = [
    {"name": "user_id"},
    {"name": "content_id"},
    {"name": "genres", "kind": "multi_hot"},
    {"name": "rating", "kind": "numeric"},
    {"name": "recent", "kind": "history", "of": "content_id", "length": 3},
    {"name": "recent_ratio", "kind": "history_mean", "of": "watch_ratio", "length": 4},
    {"name": "views", "kind": "id_count", "column": "content_id", "scheme": "ordered"},
    {"name": "mean_ratio", "kind": "target_mean", "column": "content_id", "of": "watch_ratio",
     "scheme": "ordered", "smoothing": SMOOTHING},
    {"name": "user_live", "kind": "id_count", "column": "user_id", "scheme": "online"},
    {"name": "user_train_views", "kind": "id_count", "column": "user_id"},
]  # fmt: skip


def _log(seed=0, users=12, items=15, rows=480):
    """A log whose later views bring new users and new videos: ids grow with time."""
    rng = np.random.default_rng(seed)
    time = np.sort(rng.choice(100_000, size=rows, replace=False))
    grown = np.arange(rows) / rows  # the share of the log before this view
    user = (rng.random(rows) * users * (0.5 + grown / 2)).astype(int)
    item = (rng.random(rows) * items * (0.4 + 0.6 * grown)).astype(int)
    content = pd.DataFrame(
        {
            "content_id": range(items),
            "genres": [",".join(str(g) for g in range(i % 4, i % 4 + 1 + i % 2)) for i in range(items)],
            "rating": rng.uniform(1, 5, items).round(2),
            "duration": rng.integers(20, 300, items),
        }
    )
    users_table = pd.DataFrame(
        {"user_id": range(users), "age": 20 + np.arange(users), "gender": ["F", "M"] * (users // 2)}
    )
    watch = rng.uniform(0.0, 1.2, rows) * content.duration.to_numpy()[item]
    log = pd.DataFrame({"user_id": user, "content_id": item, "watch_time": watch.round(1), "timestamp": time})
    return log, users_table, content


def _config(files, split, features=FEATURES):
    cfg = study_config(
        files,
        features=features,
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        split={"kind": "temporal", **split},
    )
    return cfg.data


def _prepared(tmp_path, name, log, users, content, split, base=None, features=FEATURES):
    folder = tmp_path / f"{name}_files"
    folder.mkdir()
    files = study_files(folder, interactions=log, users=users, content=content)
    prepare(_config(files, split, features), tmp_path / name, base=base)
    return tmp_path / name


def _decoded(data_dir, split):
    """The split's rows with ids back as tokens and dense values de-standardised."""
    schema = DatasetSchema.load(data_dir)
    table = pq.read_table(sorted((data_dir / split).glob("*.parquet")))
    out = {}
    for feature in schema.sparse:
        vocab = [None] + schema.vocab(data_dir, feature.id_space)
        column = table.column(feature.name).to_pylist()
        out[feature.name] = (
            [tuple(vocab[i] for i in row) for row in column] if feature.multi else [vocab[i] for i in column]
        )
    for dense in schema.dense:
        out[dense.name] = table.column(dense.name).to_numpy().astype(np.float64) * dense.std + dense.mean
    for label in schema.label_names:
        out[label] = table.column(label).to_numpy()
    return out


@pytest.mark.slow
def test_a_window_continues_its_base_as_a_preparation_of_the_whole_log_would(tmp_path):
    """The window's held-out rows, prepared against a base, hold what a preparation of base and
    window together gives them (histories and statistics over both, the same ids), up to what a
    base fixes: row order of the vocabularies, normalisation and the statistics' prior."""
    log, users, content = _log()
    cut = int(len(log) * 0.6)
    base_log, window_log = log.iloc[:cut], log.iloc[cut:]
    base = _prepared(tmp_path, "base", base_log, users, content, {"test_fraction": 0.0, "val_fraction": 0.0})
    split = {"test_fraction": 0.3, "val_fraction": 0.2}
    window = _prepared(tmp_path, "window", window_log, users, content, split, base=base)
    # the whole log, split so that its validation and test rows are the window's
    counts = json.loads((window / "schema.json").read_text())["meta"]["summary"]["split"]
    n_test, n_val = counts["test"]["rows"], counts["val"]["rows"]
    whole_split = {"test_fraction": n_test / len(log), "val_fraction": n_val / (len(log) - n_test)}
    whole = _prepared(tmp_path, "whole", log, users, content, whole_split)

    grown, before, everything = (DatasetSchema.load(d) for d in (window, base, whole))
    for space, size in before.vocab_sizes.items():
        tokens = grown.vocab(window, space)
        assert tokens[:size] == before.vocab(base, space), space  # known ids keep their rows
        appended = tokens[size:]
        assert appended == sorted(appended) and not set(appended) & set(tokens[:size])
        assert set(tokens) == set(everything.vocab(whole, space)), space  # the same ids as the whole log's
        assert grown.meta["base"]["growth"][space] == {
            "rows_before": size + 1, "rows_after": len(tokens) + 1, "appended": len(appended)
        }  # fmt: skip
    assert grown.vocab_sizes["content_id"] > before.vocab_sizes["content_id"]  # the log brought new videos
    assert grown.vocab_sizes["user_id"] > before.vocab_sizes["user_id"]
    assert [(d.mean, d.std) for d in grown.dense] == [(d.mean, d.std) for d in before.dense]
    assert {n: m["prior"] for n, m in grown.target_stats.items()} == {
        n: m["prior"] for n, m in before.target_stats.items()
    }
    assert grown.meta["base"]["time_range"] == before.meta["time_range"]
    assert grown.meta["time_range"][0] > before.meta["time_range"][1]

    firsts = 0  # held-out first views of a user
    for split_name in ("val", "test"):
        ours, theirs = _decoded(window, split_name), _decoded(whole, split_name)
        assert len(ours["content_id"]) == (n_val if split_name == "val" else n_test)
        for name in ("user_id", "content_id", "genres", "recent"):
            assert ours[name] == theirs[name], name
        assert any(len(h) == 3 for h in ours["recent"][:5])  # the first views already see the base's
        for name in ("rating", "views", "user_live", "user_train_views", "watch_ratio"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-4, err_msg=name)
        # a user's first view has no earlier ratio: it gets the fill, the base's training mean
        first = np.array([not h for h in ours["recent"]])
        firsts += int(first.sum())
        np.testing.assert_allclose(ours["recent_ratio"][~first], theirs["recent_ratio"][~first], atol=1e-4)
        fill = next(d.fill for d in before.dense if d.name == "recent_ratio")
        np.testing.assert_allclose(ours["recent_ratio"][first], fill, atol=1e-4)
        # a smoothed mean with the base's prior: (s + m p_whole) / (c + m), moved by
        # m (p_base - p_whole) / (c + m)
        rows = ours["views"]  # every view has a watch ratio: c = n
        shift = SMOOTHING * (
            before.target_stats["mean_ratio"]["prior"] - everything.target_stats["mean_ratio"]["prior"]
        )
        np.testing.assert_allclose(
            ours["mean_ratio"], theirs["mean_ratio"] + shift / (rows + SMOOTHING), atol=1e-4
        )

    assert firsts > 0
    # the window's training rows: ordered statistics and live counters over both (a cross-fitted
    # statistic differs by design: its folds are drawn from another log's rows)
    ours, theirs = _decoded(window, "train"), _decoded(whole, "train")

    def keys(rows):
        return list(
            zip(
                rows["user_id"], rows["content_id"], rows["recent"], rows["watch_ratio"].round(6), strict=True
            )
        )

    where = {key: i for i, key in enumerate(keys(theirs))}
    matched = np.array([where[key] for key in keys(ours)])  # the whole log's rows of the window
    assert len(set(matched)) == len(matched) == counts["train"]["rows"]
    for name in ("views", "user_live"):
        np.testing.assert_allclose(ours[name], theirs[name][matched], atol=1e-4, err_msg=name)
    shift = SMOOTHING * (
        before.target_stats["mean_ratio"]["prior"] - everything.target_stats["mean_ratio"]["prior"]
    )
    expected = theirs["mean_ratio"][matched] + shift / (ours["views"] + SMOOTHING)
    np.testing.assert_allclose(ours["mean_ratio"], expected, atol=1e-4)
    # the saved statistics carry on: the next window starts from the base's and this window's sums
    for feature in ("views", "mean_ratio", "user_live", "user_train_views"):
        ours = pq.read_table(window / "stats" / f"{feature}.parquet").to_pandas().set_index("token")
        theirs = pq.read_table(whole / "stats" / f"{feature}.parquet").to_pandas().set_index("token")
        if feature != "user_live":  # live counters count every row; the others the training rows
            theirs = theirs[theirs.n > 0]
        pd.testing.assert_frame_equal(ours.sort_index(), theirs.sort_index(), check_dtype=False, atol=1e-9)
    tail = pq.read_table(window / TAIL_FILE).to_pandas()
    assert tail.groupby("user_id").size().max() <= 4  # the longest history
    assert set(tail.user_id) == set(log.user_id)  # base users with no view in the window too
    assert ShardReader(window, "train").total_rows == counts["train"]["rows"]  # an ordinary preparation


@pytest.mark.slow
def test_a_chain_of_windows_carries_on(tmp_path):
    """A window prepared against a window of a base: the base's ids keep their rows throughout."""
    log, users, content = _log(seed=1)
    thirds = np.array_split(np.arange(len(log)), 3)
    split = {"test_fraction": 0.2, "val_fraction": 0.1}
    day1 = _prepared(tmp_path, "day1", log.iloc[thirds[0]], users, content, split)
    day2 = _prepared(tmp_path, "day2", log.iloc[thirds[1]], users, content, split, base=day1)
    day3 = _prepared(tmp_path, "day3", log.iloc[thirds[2]], users, content, split, base=day2)
    first, third = DatasetSchema.load(day1), DatasetSchema.load(day3)
    size = first.vocab_sizes["content_id"]
    assert third.vocab(day3, "content_id")[:size] == first.vocab(day1, "content_id")
    assert third.meta["base"]["dir"] == str(day2.resolve())
    counted = pq.read_table(day3 / "stats" / "user_live.parquet").column("n").to_numpy().sum()
    assert counted == len(log)  # live counters over all three windows


def _base_and_window(tmp_path, **log_options):
    log, users, content = _log(**log_options)
    cut = int(len(log) * 0.6)
    split = {"test_fraction": 0.2, "val_fraction": 0.1}
    base = _prepared(tmp_path, "base", log.iloc[:cut], users, content, split)
    folder = tmp_path / "window_files"
    folder.mkdir()
    files = study_files(folder, interactions=log.iloc[cut:], users=users, content=content)
    return base, files, split


def _refused(cfg, out, base, match):
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None
    with pytest.raises(DataError, match=match) as caught:
        prepare(cfg, out, base=base)
    after = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None
    assert after == before  # nothing written, nothing replaced
    return caught.value


def test_a_base_the_window_cannot_continue_is_refused_naming_why(tmp_path):
    base, files, split = _base_and_window(tmp_path)
    out = tmp_path / "window"
    good = _config(files, split)
    prepare(good, out, base=base)  # an earlier window's preparation there stays as it was below

    other = [dict(f, length=5) if f["name"] == "recent" else f for f in FEATURES]
    err = _refused(_config(files, split, other), out, base, r"another config: data.features")
    assert "data.features.recent.length: 3 -> 5" in str(err) and err.file.endswith("schema.json")

    _refused(good, base, base, r"the base is the output directory")

    overlapping = pd.read_csv(files["interactions"])
    overlapping.loc[7, "timestamp"] = 0
    overlapping.to_csv(files["interactions"], index=False)
    err = _refused(good, out, base, r"the window overlaps its base")
    assert err.row == 7 and err.column == "timestamp" and err.got == 0  # the data row, 0-based
    overlapping.loc[7, "timestamp"] = 10**6
    overlapping.to_csv(files["interactions"], index=False)

    vocab = base / "vocabs" / "content_id.parquet"
    data = bytearray(vocab.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vocab.write_bytes(bytes(data))
    err = _refused(good, out, base, r"CRC-32")
    assert err.file.endswith("content_id.parquet")


def test_a_base_from_before_a_feature_key_existed_continues_as_at_that_keys_default(tmp_path):
    """A release that adds a feature key (max_items) reads older bases, whose schema.json does not
    record it, as prepared at its default; a different value is still a change."""
    from engagerec.data.manifest import MANIFEST_FILE, crc32

    base, files, split = _base_and_window(tmp_path)
    schema_file = base / "schema.json"
    schema = json.loads(schema_file.read_text())
    for feature in schema["meta"]["config"]["features"]:
        assert feature.pop("max_items") == 0
    schema_file.write_text(json.dumps(schema))
    manifest = json.loads((base / MANIFEST_FILE).read_text())
    entry = manifest["files"]["schema.json"]
    entry.update(bytes=schema_file.stat().st_size, crc32=crc32(schema_file))
    (base / MANIFEST_FILE).write_text(json.dumps(manifest))
    summary = prepare(_config(files, split), tmp_path / "window", base=base)
    assert summary["rows_kept"] > 0
    other = [dict(f, max_items=2) if f["name"] == "genres" else f for f in FEATURES]
    err = _refused(_config(files, split, other), tmp_path / "window2", base, r"another config")
    assert "data.features.genres.max_items: 0 -> 2" in str(err)


def test_a_vocabulary_that_would_outgrow_its_table_is_refused_with_the_policy(tmp_path):
    base, files, split = _base_and_window(tmp_path)
    known = DatasetSchema.load(base).vocab_sizes["content_id"]
    capped = [dict(f, hash_buckets=known) if f["name"] == "content_id" else f for f in FEATURES]
    # the base had no more ids than the cap, so it kept a vocabulary; the window would pass it
    base_capped = tmp_path / "base_capped"
    prepare(config_from_dict({"name": "x", "data": {**_raw(base), "features": capped}}).data, base_capped)
    err = _refused(_config(files, split, capped), tmp_path / "window", base_capped, r"would grow from")
    assert "never turns into hashing" in str(err) and err.file.endswith("content_id.parquet")


def _raw(prepared_dir):
    return json.loads((prepared_dir / "schema.json").read_text())["meta"]["config"]


def test_a_window_with_no_rows_left_is_refused(tmp_path):
    base, files, split = _base_and_window(tmp_path)
    cfg = _config(files, split)
    empty = pd.read_csv(files["interactions"]).iloc[:0]
    empty.to_csv(files["interactions"], index=False)
    with pytest.raises(DataError, match=r"no rows left after filtering \(0 read"):
        prepare(cfg, tmp_path / "window", base=base)
    assert not (tmp_path / "window").exists()


@pytest.mark.slow
def test_an_earlier_run_scores_a_later_window_with_the_ids_added_since_on_its_oov_row(tmp_path):
    """A model trained on the base scores the window (a frozen model on the next day): exactly
    as it scores the same rows with every id appended since put on row 0 by hand."""
    from engagerec.data.manifest import write_manifest
    from engagerec.predict import predict
    from engagerec.train import train

    base, files, split = _base_and_window(tmp_path)
    window = tmp_path / "window"
    prepare(_config(files, split), window, base=base)
    run = tmp_path / "run"
    train_section = {
        "data_dir": str(base),
        "batch_size": 64,
        "epochs": 1,
        "progress_bar": False,
        "device": "cpu",
    }
    train(config_from_dict({"name": "growth", "data": _raw(base), "train": train_section}), run)
    later = predict(run, window, tmp_path / "later.parquet", split="test")

    # the oracle: the window's test rows with the appended ids set to 0, its tables the run's
    frozen = tmp_path / "frozen"
    shutil.copytree(window, frozen)
    earlier, grown = DatasetSchema.load(base), DatasetSchema.load(window)
    limits = {f.name: earlier.num_embeddings(f.id_space) for f in grown.sparse}
    on_row_0 = {}  # per single-id feature: rows scored on the OOV row (appended since, or unseen)
    for shard in sorted((frozen / "test").glob("*.parquet")):
        table = pq.read_table(shard)
        for name, limit in limits.items():
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type):
                values = column.values.to_numpy()
                fixed = pa.ListArray.from_arrays(
                    column.offsets, pa.array(np.where(values >= limit, 0, values), column.type.value_type)
                )
            else:
                values = column.to_numpy()
                on_row_0[name] = on_row_0.get(name, 0) + int(((values >= limit) | (values == 0)).sum())
                fixed = pa.array(np.where(values >= limit, 0, values), column.type)
            table = table.set_column(table.schema.get_field_index(name), name, fixed)
        pq.write_table(table, shard)
    raw = json.loads((frozen / "schema.json").read_text())
    raw["vocab_sizes"] = {**raw["vocab_sizes"], **earlier.vocab_sizes}
    shutil.rmtree(frozen / "vocabs")
    shutil.copytree(base / "vocabs", frozen / "vocabs")  # the run's vocabularies: no id appended
    (frozen / "schema.json").write_text(json.dumps(raw))
    (frozen / "manifest.json").unlink()
    write_manifest(
        frozen,
        {f"test/{p.name}": pq.ParquetFile(p).metadata.num_rows for p in (frozen / "test").glob("*.parquet")},
    )
    expected = predict(run, frozen, tmp_path / "frozen.parquet", split="test")

    columns = [c for c in pq.read_schema(tmp_path / "later.parquet").names if not c.endswith("_index")]
    assert pq.read_table(tmp_path / "later.parquet", columns=columns).equals(
        pq.read_table(tmp_path / "frozen.parquet", columns=columns)
    )
    assert later["oov_rows"] == on_row_0 == expected["oov_rows"]
    tokens = pq.read_table(window / "test", columns=["content_id"]).column(0).to_numpy()
    assert 0 < np.sum(tokens >= limits["content_id"]) <= later["oov_rows"]["content_id"]

    # the run's tables with another vocabulary (prepared again): refused, not read with other ids
    shuffled = tmp_path / "shuffled"
    shutil.copytree(base, shuffled)
    vocab = shuffled / "vocabs" / "content_id.parquet"
    table = pq.read_table(vocab)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1]), vocab)
    (shuffled / "manifest.json").unlink()
    write_manifest(
        shuffled,
        {
            f"{split}/{p.name}": pq.ParquetFile(p).metadata.num_rows
            for split in ("train", "val", "test")
            for p in (shuffled / split).glob("*.parquet")
        },
    )
    with pytest.raises(DataError, match=r"encoded differently from the run's, and does not continue it"):
        predict(run, shuffled, tmp_path / "shuffled.parquet", split="test")


def test_a_run_refuses_data_that_does_not_continue_its_own(tmp_path):
    """Data prepared again from scratch (another vocabulary order) is refused: its ids would be
    read as other ids."""
    from engagerec.data.growth import known_rows

    base, files, split = _base_and_window(tmp_path)
    window = tmp_path / "window"
    prepare(_config(files, split), window, base=base)
    assert known_rows(window, base)["content_id"] == DatasetSchema.load(base).num_embeddings("content_id")
    scratch = tmp_path / "scratch"
    log = pd.read_csv(files["interactions"])
    log[log.content_id != 0].to_csv(files["interactions"], index=False)  # a known id missing
    prepare(_config(files, split), scratch)  # the window alone: its own vocabularies
    with pytest.raises(DataError, match=r"id space 'content_id': the run's vocabulary .* is not the start"):
        known_rows(scratch, base)


def test_labels_relative_to_a_group_cannot_continue_a_base(tmp_path):
    log, users, content = _log()
    split = {"test_fraction": 0.2, "val_fraction": 0.1}
    cut = int(len(log) * 0.6)
    configs = []
    for name, rows in (("base", log.iloc[:cut]), ("window", log.iloc[cut:])):
        (tmp_path / f"{name}_files").mkdir()
        cfg = _config(
            study_files(tmp_path / f"{name}_files", interactions=rows, users=users, content=content), split
        )
        cfg.labels[1].relative_to = "user"  # skip: below the user's own median (training cuts, not stored)
        configs.append(cfg)
    prepare(configs[0], tmp_path / "base")
    _refused(
        configs[1],
        tmp_path / "out",
        tmp_path / "base",
        r"relative to a group: their training cuts are not stored",
    )
