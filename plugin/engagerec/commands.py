"""What each of the library's ``engagerec`` commands does, one function per command: it calls
the library, prints for the console (rank 0 only, under torchrun) and returns the exit status.
cli.py parses the arguments and calls these; the study's commands (compare, refit, results)
come from the ``engagerec.commands`` entry points instead (engagerec.cli). Each imports what
it runs when it runs, so that ``engagerec --help`` stays quick."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from engagerec.config import load_config, prepared_dir
from engagerec.errors import ConfigError


def prepare(
    config: str, sets: List[str], out: Optional[str] = None, as_json: bool = False, base: Optional[str] = None
) -> int:
    """``engagerec prepare``: a config's tables -> prepared data; prints the summary.

    Args:
        config: the config file (or a shipped config's name).
        sets: ``key=value`` overrides.
        out: the output directory (default: where train reads, ``train.data_dir`` else
            ``prepared/<name>``).
        as_json: also print the summary as JSON.
        base: an earlier preparation that this one continues (engagerec.data.growth).
    """
    from engagerec.data.prepare import format_summary
    from engagerec.data.prepare import prepare as prepare_data

    cfg = load_config(config, sets)
    out = out or prepared_dir(cfg)
    summary = prepare_data(cfg.data, out, base=base)
    if summary["stale_scratch_freed_bytes"]:
        freed = summary["stale_scratch_freed_bytes"] / 2**20
        print(
            f"removed the scratch of an earlier, dead prepare beside {out}: {freed:,.1f} MiB freed",
            file=sys.stderr,
        )
    print(format_summary(summary, out))
    if as_json:
        print(json.dumps(summary, indent=1))
    return 0


def verify(data_dir: str, as_json: bool = False) -> int:
    """``engagerec prepare --verify DIR``: every file of a preparation against its manifest
    (size, CRC-32) and every shard's rows against its footer; prints what was checked.

    Args:
        data_dir: the prepared directory.
        as_json: also print the counts as JSON.

    Raises:
        DataError: naming the first file that differs, and how.
    """
    from engagerec.data.manifest import verify_prepared

    checked = verify_prepared(data_dir)
    print(
        f"{data_dir}: intact ({checked['files']} files, {checked['bytes'] / 2**20:,.1f} MiB, "
        f"{checked['rows']:,} rows; sizes, CRC-32 and rows match manifest.json) in {checked['seconds']:g} s"
    )
    if as_json:
        print(json.dumps(checked, indent=1))
    return 0


def train(
    config: str, sets: List[str], out: Optional[str] = None, resume: bool = True,
    allow_config_change: bool = False, verify_data: bool = False,
) -> int:  # fmt: skip
    """``engagerec train``: one run (one process, or every rank under torchrun); rank 0 prints its
    test metrics and directory.

    Args:
        config: the config file (or a shipped config's name).
        sets: ``key=value`` overrides.
        out: the run directory (default ``runs.seed_run_dir("runs/<name>", tower, seed)``).
        resume: continue from the run directory's checkpoint.
        allow_config_change: resume although the config differs from the checkpoint's.
        verify_data: check every file of the prepared data against its CRC-32 first (the first
            rank of each machine, before any step).

    Returns:
        int: 0, or ``preemption.PREEMPTED`` (75) when SIGTERM stopped it after a checkpoint.
    """
    from engagerec.distributed import is_rank_zero
    from engagerec.preemption import PREEMPTED
    from engagerec.runs import seed_run_dir
    from engagerec.train import train as train_run

    cfg = load_config(config, sets)
    if verify_data and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        # one read per machine: the other ranks wait for this one at the process group's start,
        # and torchrun stops them if it fails
        from engagerec.data.manifest import verify_prepared

        verify_prepared(prepared_dir(cfg))
    run_dir = out or seed_run_dir(f"runs/{cfg.name}", cfg.model.tower.name, cfg.train.seed)
    results = train_run(cfg, run_dir, resume=resume, allow_config_change=allow_config_change)
    if results.get("preempted"):
        if is_rank_zero():
            print(
                f"stopped by SIGTERM after step {results['steps']}; its checkpoint is in "
                f"{run_dir}/checkpoints: run the same command to resume (exit status {PREEMPTED})"
            )
        return PREEMPTED
    if not is_rank_zero():
        return 0
    if "test" in results:
        print(
            f"test ({results['tower']}, seed {results['seed']}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "rows")
        )
    print(f"run directory: {run_dir}")
    return 0


def evaluate(
    run_dir: str, split: str, checkpoint_name: str, device: Optional[str], json_out: Optional[str] = None
) -> int:
    """``engagerec evaluate``: a run's checkpoint on a split; rank 0 prints the metrics as JSON.

    Args:
        run_dir: the run directory.
        split: ``train``, ``val`` or ``test``.
        checkpoint_name: ``best`` or ``latest``.
        device: ``auto``, ``cpu``, ``cuda``, or None for the run's ``train.device``.
        json_out: also write the metrics to this file.
    """
    from engagerec.distributed import is_rank_zero
    from engagerec.runs import evaluate_run

    metrics = evaluate_run(run_dir, split, checkpoint_name, device)
    if is_rank_zero():
        print(json.dumps(metrics, indent=1))
        if json_out:
            Path(json_out).write_text(json.dumps(metrics, indent=1))
    return 0


def predict(run_dirs: List[str], source: str, out: str, as_json: bool = False, **options) -> int:
    """``engagerec predict``: score raw tables or a prepared split with one run or the mean of
    several (``predict.predict_mean``); rank 0 prints the summary.

    Args:
        run_dirs: the runs averaged (one: that run's predictions).
        source: raw interaction rows or a prepared directory.
        out: the output parquet file.
        as_json: also print the summary as JSON.
        **options: ``predict_mean``'s keyword arguments (split, users, content, threshold,
            batch_size, checkpoint_name, device).
    """
    from engagerec.distributed import is_rank_zero
    from engagerec.predict import format_summary, predict_mean

    summary = predict_mean(run_dirs, source, out, **options)
    if is_rank_zero():
        print(format_summary(summary))
        if as_json:
            print(json.dumps(summary, indent=1))
    return 0


def export(run_dir: str, out: str, **options) -> int:
    """``engagerec export``: a run's checkpoint as torch.export programs; prints the record.

    Args:
        run_dir: the run directory.
        out: the output directory.
        **options: ``export.export_run``'s keyword arguments (int8, aoti, checkpoint_name,
            check_split, check_rows).
    """
    from engagerec.export import export_run, format_record

    print(format_record(export_run(run_dir, out, **options), out))
    return 0


def synthesize(
    out: str,
    config: Optional[str],
    sets: List[str],
    shape: Optional[str],
    scale: float,
    seed: int,
    popularity_skew: Optional[float] = None,
    videos: Optional[int] = None,
    video_arrival: Optional[float] = None,
    user_arrival: Optional[float] = None,
) -> int:
    """``engagerec synthesize``: a config's synthetic source tables, or KuaiRand-1K-shaped files.

    Args:
        out: the output directory.
        config: a config whose ``data.source.synthetic`` says what to generate (or None).
        sets: ``key=value`` overrides of ``config``.
        shape: ``kuairand-1k`` for KuaiRand's official layout and sizes (or None).
        scale: with ``shape``: the fraction of the real sizes.
        seed: with ``shape``: the generator's seed.
        popularity_skew: with ``shape``: the videos' popularity power law's exponent (None:
            the generator's default, 1.05).
        videos: with ``shape``: the catalogue's size (None: KuaiRand-1K's times ``scale``).
        video_arrival: with ``shape``: the share of videos uploaded during the log (None: 0).
        user_arrival: with ``shape``: the share of users who join during the log (None: 0).

    Raises:
        ConfigError: both or neither of ``config`` and ``shape``, or a shape's option without it.
    """
    if shape:
        if config:
            raise ConfigError("synthesize takes --config or --shape, not both")
        from engagerec.data.kuairand_generator import ZIPF_EXPONENT, write_kuairand_1k

        skew = ZIPF_EXPONENT if popularity_skew is None else popularity_skew
        floors = write_kuairand_1k(
            out,
            scale=scale,
            seed=seed,
            popularity_skew=skew,
            videos=videos,
            video_arrival=video_arrival or 0.0,
            user_arrival=user_arrival or 0.0,
        )
        print(
            f"wrote a KuaiRand-1K-shaped dataset (scale {scale:g}, seed {seed}, popularity skew {skew:g}) "
            f"to {out}: {floors['rows']:,} rows, {floors['users']:,} users, {floors['videos']:,} videos "
            + (
                f"(about {floors['expected_distinct_videos']:,.0f} of them viewed)"
                if floors["expected_distinct_videos"] is not None
                else f"({floors['video_arrival']:.0%} of them uploaded during the log)"
            )
            + (f"; {floors['user_arrival']:.0%} of the users join during the log" if user_arrival else "")
            + "; noise floors in "
            f"{out}/noise_floor.json"
        )
        return 0
    if any(option is not None for option in (popularity_skew, videos, video_arrival, user_arrival)):
        raise ConfigError(
            "--popularity-skew, --videos, --video-arrival and --user-arrival shape the --shape "
            "kuairand-1k data only"
        )
    if not config:
        raise ConfigError("synthesize needs --config (a synthetic source) or --shape kuairand-1k")
    from engagerec.data.synthetic import synthetic_tables

    synthetic = load_config(config, sets).data.source.synthetic
    tables = synthetic_tables(synthetic, out)
    files = [tables.interactions, tables.users, tables.content]
    print(f"wrote {synthetic.num_rows:,} synthetic rows ({synthetic.kind}): "
          + ", ".join(f for t in files if t for f in t.files))  # fmt: skip
    return 0


def describe(config: str, sets: List[str], towers: Optional[List[str]], data: Optional[str] = None) -> int:
    """``engagerec describe``: parameter counts per embedding table, tower and head.

    Args:
        config: the config file (or a shipped config's name).
        sets: ``key=value`` overrides.
        towers: tower names, or ``["all"]`` (default: the config's tower).
        data: the prepared data directory (default ``prepared/<name>``).
    """
    from engagerec.runs import describe as describe_config

    cfg = load_config(config, sets)
    print(describe_config(cfg, towers or [cfg.model.tower.name], data))
    return 0
