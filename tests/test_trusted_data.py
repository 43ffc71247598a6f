"""Prepared data that can be trusted like the checkpoints: a manifest checked on open and on
demand, page checksums on read, an atomic re-prepare, no stale scratch, one prepare at a time,
and messages that name the real cause (a full disk, an input without rows)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engagerec.cli import main
from engagerec.data.errors import DataError
from engagerec.data.manifest import MANIFEST_FILE, check_prepared, verify_prepared
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.predict import predict

REPO = Path(__file__).resolve().parent.parent
SLOW = pytest.mark.slow
# a synthetic preparation big enough to be caught mid-write: 300k rows in shards of 20k
KILL_SETS = [
    "data.source.synthetic.num_rows=300000",
    "data.rows_per_file=20000",
    "data.row_group_size=5000",
]


@pytest.fixture
def prepared_copy(kuairand_random, tmp_path):
    """A private copy of the bundled data's preparation, to damage."""
    data_dir, _, _ = kuairand_random
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def _largest_shard(data_dir: Path, split: str = "train") -> Path:
    return max((data_dir / split).glob("part-*.parquet"), key=lambda p: p.stat().st_size)


def _flip(path: Path, at: float, count: int = 64) -> None:
    """Invert ``count`` bytes at a fraction of the file: its size stays the same."""
    with open(path, "r+b") as handle:
        handle.seek(int(path.stat().st_size * at))
        data = handle.read(count)
        handle.seek(int(path.stat().st_size * at))
        handle.write(bytes(b ^ 0xFF for b in data))


def _read_all(data_dir: Path, split: str = "train") -> int:
    reader = ShardReader(data_dir, split, batch_size=4096, rank=0, world_size=1)
    return sum(len(batch.weights) for batch in make_loader(reader))


def _manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / MANIFEST_FILE).read_text())["files"]


def _engagerec(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engagerec", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_the_manifest_lists_every_file_with_its_size_checksum_and_shard_rows(kuairand_random, capsys):
    data_dir, summary, _ = kuairand_random
    entries = _manifest(data_dir)
    on_disk = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    assert set(entries) == on_disk - {MANIFEST_FILE}
    for split in ("train", "val", "test"):
        rows = sum(e["rows"] for name, e in entries.items() if name.startswith(f"{split}/"))
        assert rows == summary["split"][split]["rows"]
    assert all(entries[name]["bytes"] == (data_dir / name).stat().st_size for name in entries)
    assert main(["prepare", "--verify", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{data_dir}: intact ({len(entries)} files" in out
    assert f"{sum(summary['split'][s]['rows'] for s in ('train', 'val', 'test')):,} rows" in out


def test_flipped_bytes_in_a_shard_fail_verification_and_the_read_naming_file_and_row_group(prepared_copy):
    shard = _largest_shard(prepared_copy)
    _flip(shard, 0.5)
    # the size is unchanged: the check on open passes, the full check does not
    check_prepared(prepared_copy)
    with pytest.raises(DataError, match=rf"{shard}: does not match its CRC-32 in manifest.json"):
        verify_prepared(prepared_copy)
    # without verification, reading the damaged page fails on its checksum, never with wrong values
    with pytest.raises(
        DataError, match=rf"file {shard}: row group \d+ cannot be read \(.*CRC.*the shard is damaged"
    ):
        _read_all(prepared_copy)
    assert _read_all(prepared_copy, "test") > 0  # the other splits are intact


def test_train_on_a_damaged_shard_is_one_line_naming_the_file_and_verify_data_stops_it_first(
    prepared_copy, tmp_path
):
    shard = _largest_shard(prepared_copy)
    _flip(shard, 0.5)
    common = ["--config", "configs/kuairand_random.yaml", "--set", f"train.data_dir={prepared_copy}"]
    common += ["--set", "train.progress_bar=false", "--set", "train.epochs=1"]
    done = _engagerec("train", *common, "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"file {shard}: row group" in done.stderr and "the shard is damaged" in done.stderr
    checked = _engagerec("train", *common, "--out", str(tmp_path / "checked"), "--verify-data")
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert f"{shard}: does not match its CRC-32" in checked.stderr
    assert not (tmp_path / "checked").exists()  # refused before the run began


def test_a_truncated_missing_extra_or_miscounted_shard_is_refused_when_opened(prepared_copy):
    shard = _largest_shard(prepared_copy)
    size = shard.stat().st_size
    original = shard.read_bytes()
    shard.write_bytes(original[: size // 2])
    with pytest.raises(
        DataError, match=rf"{shard}: has {size // 2:,} bytes, but manifest.json records {size:,}"
    ):
        ShardReader(prepared_copy, "train")
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard}: a file of the preparation is missing"):
        ShardReader(prepared_copy, "val")  # any split: the whole preparation is checked
    shard.write_bytes(original)
    stray = prepared_copy / "train" / "part-99999.parquet"
    shutil.copy(shard, stray)
    with pytest.raises(DataError, match=rf"{stray}: is not in manifest.json"):
        ShardReader(prepared_copy, "train")
    stray.unlink()
    manifest = json.loads((prepared_copy / MANIFEST_FILE).read_text())
    name = shard.relative_to(prepared_copy).as_posix()
    manifest["files"][name]["rows"] += 1
    (prepared_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    rows = manifest["files"][name]["rows"]
    with pytest.raises(
        DataError, match=rf"{shard}: holds {rows - 1:,} rows, but engagerec prepare wrote {rows:,}"
    ):
        ShardReader(prepared_copy, "train")


def test_a_damaged_footer_is_named_when_the_split_is_opened(prepared_copy):
    shard = _largest_shard(prepared_copy, "test")
    _flip(shard, 0.999, count=8)  # inside the footer (the last bytes before its length and magic)
    with pytest.raises(DataError, match=rf"{shard}: the parquet footer cannot be read .*shard is damaged"):
        ShardReader(prepared_copy, "test")


def test_a_preparation_without_its_manifest_is_incomplete_for_every_reader(
    prepared_copy, kuairand_run, tmp_path
):
    (prepared_copy / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match="incomplete preparation: it has no manifest.json"):
        ShardReader(prepared_copy, "test")
    with pytest.raises(DataError, match="incomplete preparation"):
        verify_prepared(prepared_copy)
    run, _ = kuairand_run
    with pytest.raises(DataError, match="incomplete preparation"):
        predict(run, prepared_copy, tmp_path / "p.parquet")


# where a prepare is when its staging directory shows: loading and joining, vocabularies written,
# train shards being written, val being written, schema.json written (the swap is next)
STAGES = {
    "staging": lambda staged: True,
    "vocabs": lambda staged: any((staged / "vocabs").glob("*")),
    "shards": lambda staged: any((staged / "train").glob("*parquet*")),
    "val": lambda staged: (staged / "val").exists(),
    "schema": lambda staged: (staged / "schema.json").exists(),
}


def _kill_prepare_at(out: Path, moment: str, delay: float = 0.0) -> bool:
    """Start `engagerec prepare` into ``out`` and SIGKILL it at ``moment``: a stage of STAGES, or
    ``"after"`` ``delay`` seconds. True when the kill found it running (it may finish first)."""
    command = [sys.executable, "-m", "engagerec", "prepare", "--config", "synthetic_study", "--out", str(out)]
    process = subprocess.Popen(
        command + _sets(KILL_SETS), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = time.monotonic()
    try:
        while process.poll() is None and time.monotonic() - started < 120:
            staged = sorted(
                out.parent.glob(f".{out.name}.prepare-{process.pid}-*")
            )  # its own, not a dead one's
            if moment == "after" and time.monotonic() - started >= delay:
                break
            if moment in STAGES and staged and STAGES[moment](staged[-1]):
                break
            time.sleep(0.002)
        return process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@SLOW
def test_a_prepare_killed_at_any_moment_leaves_the_old_or_the_new_preparation_whole(tmp_path):
    out = tmp_path / "data"
    first = _engagerec("prepare", "--config", "synthetic_study", "--out", str(out), *_sets(KILL_SETS[1:]))
    assert first.returncode == 0, first.stderr
    before = _manifest(out)
    started = time.monotonic()
    timed = _engagerec(
        "prepare", "--config", "synthetic_study", "--out", str(tmp_path / "t"), *_sets(KILL_SETS)
    )
    assert timed.returncode == 0, timed.stderr
    seconds = time.monotonic() - started
    new_rows = verify_prepared(tmp_path / "t")["rows"]  # what a finished prepare of the new data holds
    assert new_rows != verify_prepared(out)["rows"]
    # every stage, then seeded "random" moments over the whole prepare (the same in every CI run)
    moments = [(stage, 0.0) for stage in STAGES]
    moments += [("after", d) for d in np.random.default_rng(7).uniform(0.0, 1.0, size=4) * seconds]
    for moment, delay in moments:
        running = _kill_prepare_at(out, moment, delay)
        assert running or moment in ("schema", "after"), f"prepare finished before the {moment} stage"
        rows = verify_prepared(out)["rows"]  # whole: every file matches its manifest
        # the old preparation byte for byte (CRC-32), or the new one where the prepare got to swap
        assert _manifest(out) == before or rows == new_rows, moment
        assert _read_all(out, "val") == DatasetSchema.load(out).meta["splits"]["val"]["rows"]
    stale = list(tmp_path.glob(".data.prepare-*"))  # a kill that came after its prepare finished leaves none
    again = _engagerec("prepare", "--config", "synthetic_study", "--out", str(out), *_sets(KILL_SETS))
    assert again.returncode == 0, again.stderr
    assert ("removed the scratch of an earlier, dead prepare" in again.stderr) == bool(stale)
    assert not list(tmp_path.glob(".data.prepare-*"))  # nothing stale left beside it
    assert verify_prepared(out)["rows"] == new_rows


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@SLOW
def test_a_first_prepare_killed_leaves_an_incomplete_preparation_that_every_reader_refuses(tmp_path, capsys):
    out = tmp_path / "data"
    _kill_prepare_at(out, "shards")
    assert not out.exists()
    for read in (lambda: ShardReader(out, "train"), lambda: DatasetSchema.load(out)):
        with pytest.raises(
            DataError, match=r"incomplete preparation: a prepare into this directory is running"
        ):
            read()
    assert main(["prepare", "--verify", str(out)]) == 2
    assert "incomplete preparation" in capsys.readouterr().err
    stale = sum(p.stat().st_size for p in tmp_path.glob(".data.prepare-*/**/*") if p.is_file())
    assert stale > 0
    again = _engagerec("prepare", "--config", "synthetic_study", "--out", str(out), *_sets(KILL_SETS))
    assert again.returncode == 0, again.stderr
    assert f"{stale / 2**20:,.1f} MiB freed" in again.stderr
    verify_prepared(out)


def _tiny_config():
    from engagerec.config import config_from_dict

    synthetic = {"num_rows": 2000, "num_users": 50, "num_contents": 40}
    return config_from_dict(
        {"name": "tiny", "data": {"source": {"adapter": "synthetic", "synthetic": synthetic},
                                  "features": [{"name": "user_id"}, {"name": "rating", "kind": "numeric"}]}}
    ).data  # fmt: skip


def test_scratch_an_older_prepare_left_inside_the_output_is_removed_and_counted(tmp_path):
    from engagerec.data.prepare import prepare

    out = tmp_path / "data"
    prepare(_tiny_config(), out)
    scratch = out / ".prepare-q85pdktl"  # where prepares before the manifest kept DuckDB's spill
    scratch.mkdir()
    (scratch / "spill.tmp").write_bytes(b"\0" * 3 * 2**20)
    summary = prepare(_tiny_config(), out)
    assert summary["stale_scratch_freed_bytes"] == 3 * 2**20  # `engagerec prepare` prints "3.0 MiB freed"
    assert not scratch.exists()
    verify_prepared(out)


def test_killed_after_the_atomic_exchange_the_new_preparation_is_in_place_and_the_old_one_is_scratch(
    tmp_path,
):
    from engagerec.data import staging
    from engagerec.data.prepare import prepare

    out = tmp_path / "data"
    prepare(_tiny_config(), out)
    new = staging.new_staging(out)
    shutil.copytree(out, new, dirs_exist_ok=True)
    (new / "marker").write_text("new")  # which of the two is in place
    with pytest.MonkeyPatch.context() as patch:  # the process dies right after the exchange
        patch.setattr(staging.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            staging.swap_in(new, out)
    assert (out / "marker").read_text() == "new" and not (new / "marker").exists()
    with staging.PrepareLock(out):
        assert staging.clean_stale(out) > 0  # the old preparation, left as a dead staging directory
    assert not new.exists()


def test_the_working_directory_and_a_symlinked_output_are_handled(tmp_path, monkeypatch):
    from engagerec.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="is the working directory or holds it"):
        prepare(_tiny_config(), ".")
    with pytest.raises(DataError, match="is the working directory or holds it"):
        prepare(_tiny_config(), "..")
    target = tmp_path / "real"
    prepare(_tiny_config(), target)
    (tmp_path / "link").symlink_to(target)
    prepare(_tiny_config(), tmp_path / "link")  # a re-prepare through the link replaces its target
    assert (tmp_path / "link").is_symlink() and verify_prepared(tmp_path / "link")["rows"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["link", "real"]


def test_a_second_prepare_into_the_same_directory_is_refused_naming_the_first(tmp_path):
    from conftest import prepare_synthetic

    out = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from engagerec.data.staging import PrepareLock\n"
         f"with PrepareLock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=rf"{out}: another prepare \(process {holder.pid}\) is writing"):
            prepare_synthetic(out)
    finally:
        holder.kill()
        holder.wait()
    prepare_synthetic(out)  # the kernel dropped the dead holder's lock
    verify_prepared(out)


def test_an_output_directory_holding_other_files_is_refused_and_left_alone(tmp_path):
    from conftest import prepare_synthetic

    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that are not a preparation \(notes.txt\)"):
        prepare_synthetic(out)
    assert (out / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".data.prepare-*"))


def test_a_header_only_log_at_predict_says_no_rows(kuairand_run, tmp_path):
    run, _ = kuairand_run
    log = REPO / "datasets/kuairand/processed_standard_kcore_15.csv"
    header_only = tmp_path / "header_only.csv"
    header_only.write_text(log.open().readline())
    with pytest.raises(DataError, match=r"header_only.csv: no rows to score: the input holds a header and"):
        predict(run, header_only, tmp_path / "p.parquet")


FULL_DISK_SCRIPT = """
import sys, torch
from engagerec import checkpoint
from engagerec.cli import main
from engagerec.errors import CheckpointError
disk = sys.argv[1]
print("prepare exit", main(["prepare", "--config", "configs/kuairand_random.yaml", "--out", disk + "/data"]))
model = torch.nn.Linear(512, 512)
try:
    checkpoint.save(__import__("pathlib").Path(disk) / "ckpt", "step-1", model,
                    torch.optim.Adam(model.parameters()), {"step": 1})
except CheckpointError as err:
    print("checkpoint:", err)
"""


def test_a_full_output_disk_is_named_with_its_free_space_for_prepare_and_checkpoints(tmp_path):
    """A 512 KiB tmpfs, mounted in a private mount namespace (root, or a user namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    inner = f"mount -t tmpfs -o size=512k tmpfs {disk} && exec {sys.executable} {script} {disk}"
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare) to mount a small disk in")
    done = subprocess.run(
        [*unshare, "sh", "-c", inner], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (
        f"engagerec prepare: error: file {disk}/data: no space left on the disk while writing the "
        "prepared data (" in done.stderr
    )
    assert "prepare exit 2" in done.stdout
    assert "KiB free there)" in done.stderr or "bytes free there)" in done.stderr
    assert "checkpoint: writing checkpoint" in done.stdout and "no space left on the disk" in done.stdout
    assert "there is no earlier checkpoint" in done.stdout


def test_the_manifest_and_staging_modules_import_no_pyarrow_duckdb_or_torch():
    # the manifest check runs in the GBDT's process and in serving code: no pyarrow, no DuckDB
    code = (
        "import sys; import engagerec.data.manifest, engagerec.data.staging; "
        "print(sorted(m for m in ('pyarrow', 'duckdb', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_without_an_atomic_exchange_two_renames_swap_and_a_kill_between_them_is_repaired(
    tmp_path, monkeypatch
):
    from engagerec.data import staging

    out = tmp_path / "data"
    out.mkdir()
    (out / "schema.json").write_text("old")
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    new = staging.new_staging(out)
    (new / "schema.json").write_text("new")
    staging.swap_in(new, out)
    assert (out / "schema.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "data"
    ]
    # killed between the renames: the old preparation aside, none in place; the next prepare restores it
    out.rename(tmp_path / ".data.replaced-123")
    with staging.PrepareLock(out):
        staging.clean_stale(out)
    assert (out / "schema.json").read_text() == "new" and not list(tmp_path.glob(".data.replaced-*"))


def test_a_damaged_vocabulary_is_refused_when_the_data_is_opened(prepared_copy):
    vocab = max((prepared_copy / "vocabs").glob("*.parquet"), key=lambda p: p.stat().st_size)
    _flip(vocab, 0.5, count=8)  # same size: only its CRC-32, checked on open for the small files, tells
    with pytest.raises(DataError, match=rf"{vocab}: does not match its CRC-32 in manifest.json"):
        ShardReader(prepared_copy, "test")
