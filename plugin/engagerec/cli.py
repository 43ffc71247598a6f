"""`engagerec <command>`: thin wrappers over the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from engagerec.config import ConfigError, load_config, prepared_dir
from engagerec.data.errors import DataError
from engagerec.errors import CheckpointError, TrainingError
from engagerec.extras import missing_extra
from engagerec.host_memory import keep_freed_memory


def _prepare(args: argparse.Namespace) -> int:
    from engagerec.data.prepare import format_summary, prepare

    cfg = load_config(args.config, args.set)
    out = args.out or prepared_dir(cfg)  # where train will look: train.data_dir, else prepared/<name>
    summary = prepare(cfg.data, out)
    print(format_summary(summary, out))
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM with a checkpoint; run again to resume


def _train(args: argparse.Namespace) -> int:
    from engagerec.train import train

    cfg = load_config(args.config, args.set)
    run_dir = args.out or f"runs/{cfg.name}/{cfg.model.tower.name}/seed{cfg.train.seed}"
    results = train(cfg, run_dir, resume=not args.no_resume, allow_config_change=args.allow_config_change)
    if results.get("preempted"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"stopped by SIGTERM after step {results['steps']}; its checkpoint is in "
                f"{run_dir}/checkpoints: run the same command to resume (exit status {PREEMPTED})"
            )
        return PREEMPTED  # not 0: a job that exits 0 counts as finished and is not restarted
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "test" in results:
        print(
            f"test ({results['tower']}, seed {results['seed']}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "rows")
        )
    print(f"run directory: {run_dir}")
    return 0


def _refit(args: argparse.Namespace) -> int:
    from engagerec.compare import prepare_refit_data, refit_run
    from engagerec.runs import run_config

    chosen = Path(args.run_dir)
    chosen_data = Path(prepared_dir(run_config(chosen))).resolve()
    data_dir = Path(args.data_dir) if args.data_dir else chosen_data.with_name(chosen_data.name + "_refit")
    out = Path(args.out) if args.out else chosen.resolve().with_name(chosen.resolve().name + "_refit")
    if out.resolve() == chosen.resolve():
        raise ConfigError(f"--out {out} is the chosen run itself: the refit would overwrite it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process prepares; ranks would race
        if not (data_dir / "schema.json").is_file():
            raise ConfigError(
                f"under torchrun the refit's data must be prepared first: run `engagerec refit "
                f"--run-dir {chosen} --data-dir {data_dir} --prepare-only` in one process"
            )
    elif not prepare_refit_data(chosen, data_dir):
        print(f"refit data: {data_dir} (already prepared)")
    if args.prepare_only:
        return 0
    results = refit_run(chosen, data_dir, out)
    if int(os.environ.get("RANK", "0")) != 0:
        return PREEMPTED if results.get("preempted") else 0
    if results.get("preempted"):
        print(
            f"stopped by SIGTERM; run the same command to resume the refit in {out} (exit status {PREEMPTED})"
        )
        return PREEMPTED
    print(f"refit {chosen} on train + val for {len(results['history'])} epoch(s) (its validation's choice)")
    if "test" in results:
        print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "rows"))
    print(f"run directory: {out} (its own output: {out / 'train.out'})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from engagerec.runs import evaluate_run

    metrics = evaluate_run(args.run_dir, args.split, args.checkpoint, args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(metrics, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from engagerec.predict import format_summary, predict_mean

    summary = predict_mean(
        args.run_dir,
        args.input,
        args.out,
        split=args.split,
        users=args.users,
        content=args.content,
        threshold=args.threshold,
        batch_size=args.batch_size,
        checkpoint_name=args.checkpoint,
        device=args.device,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        if args.json:
            print(json.dumps(summary, indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from engagerec.export import export_run, format_record

    record = export_run(
        args.run_dir,
        args.out,
        int8=args.int8,
        checkpoint_name=args.checkpoint,
        check_split=args.check_split,
        check_rows=args.check_rows,
    )
    print(format_record(record, args.out))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import time

    from engagerec.compare import run_comparison

    cfg = load_config(args.config, args.set)
    out = Path(args.out or f"runs/{cfg.name}/compare")
    towers = args.towers.split(",") if args.towers else [cfg.model.tower.name]
    started = time.perf_counter()
    table = run_comparison(
        cfg,
        towers,
        [int(s) for s in args.seeds.split(",")],
        out,
        resume=not args.no_resume,
        gbdt=args.gbdt,
        reference=args.reference,
    )
    print(table)
    print(f"wrote {out}/compare.md, compare.json, compare.png in {time.perf_counter() - started:.0f} s")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    if args.shape:
        if args.config:
            raise ConfigError("synthesize takes --config or --shape, not both")
        from engagerec.data.kuairand_generator import write_kuairand_1k

        floors = write_kuairand_1k(args.out, scale=args.scale, seed=args.seed)
        print(
            f"wrote a KuaiRand-1K-shaped dataset (scale {args.scale:g}, seed {args.seed}) to {args.out}: "
            f"{floors['rows']:,} rows, {floors['users']:,} users, {floors['videos']:,} videos; "
            f"noise floors in {args.out}/noise_floor.json"
        )
        return 0
    if not args.config:
        raise ConfigError("synthesize needs --config (a synthetic source) or --shape kuairand-1k")
    from engagerec.data.synthetic import synthetic_tables

    cfg = load_config(args.config, args.set)
    synthetic = cfg.data.source.synthetic
    tables = synthetic_tables(synthetic, args.out)
    files = [tables.interactions, tables.users, tables.content]
    print(f"wrote {synthetic.num_rows:,} synthetic rows ({synthetic.kind}): "
          + ", ".join(f for t in files if t for f in t.files))  # fmt: skip
    return 0


def _describe(args: argparse.Namespace) -> int:
    from engagerec.runs import describe

    cfg = load_config(args.config, args.set)
    print(describe(cfg, args.towers.split(",") if args.towers else [cfg.model.tower.name], args.data))
    return 0


def _results(args: argparse.Namespace) -> int:
    import time

    from engagerec.results import make_results

    started = time.perf_counter()
    spent = make_results(
        args.out,
        args.cache,
        args.work,
        sections=args.sections.split(",") if args.sections else None,
        seeds=[int(s) for s in args.seeds.split(",")],
        fresh=args.fresh,
    )
    computed = [name for name, seconds in spent.items() if seconds > 0]
    print(
        f"wrote {args.out} in {time.perf_counter() - started:.0f} s "
        f"(computed: {', '.join(computed) or 'none, all cached'})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``engagerec`` parser: one subcommand per job, each with its handler as ``handler``."""
    parser = argparse.ArgumentParser(prog="engagerec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", help="tables -> labelled, split, encoded parquet shards + schema.json"
    )
    prep.add_argument("--config", required=True)
    prep.add_argument("--out", help="output directory (default prepared/<name>)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    prep.add_argument("--json", action="store_true", help="also print the summary as JSON")
    prep.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train one model (1 process, or under torchrun)")
    train.add_argument("--config", required=True)
    train.add_argument("--out", help="run directory (default runs/<name>/<tower>/seed<seed>)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument(
        "--no-resume", action="store_true", help="ignore checkpoints already in the run directory"
    )
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the checkpoint's (beyond run length and logging)",
    )
    train.set_defaults(handler=_train)

    compare = commands.add_parser("compare", help="train several towers x seeds; markdown + JSON + plot")
    compare.add_argument("--config", required=True)
    compare.add_argument("--towers", help="comma-separated (default: the config's tower)")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    compare.add_argument("--out", help="output directory (default runs/<name>/compare)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--no-resume", action="store_true")
    compare.add_argument(
        "--gbdt", action="store_true", help="add the scikit-learn GBDT reference (target-encoded ids)"
    )
    compare.add_argument(
        "--reference", help="the model the others are paired with by seed (default: the GBDT, else the first)"
    )
    compare.set_defaults(handler=_compare)

    refit = commands.add_parser(
        "refit",
        help="train a chosen run again on its training and validation rows together, for the epochs "
        "its validation chose (the same test rows)",
    )
    refit.add_argument("--run-dir", required=True, help="the chosen run (written by `engagerec train`)")
    refit.add_argument(
        "--data-dir",
        help="its data without validation rows (default: the run's data directory + _refit, e.g. "
        "prepared/<name>_refit; prepared when absent, refused when it holds other data)",
    )
    refit.add_argument("--out", help="the refit run's directory (default: <run-dir>_refit beside it)")
    refit.add_argument("--prepare-only", action="store_true", help="prepare the refit's data, then stop")
    refit.set_defaults(handler=_refit)

    evaluate = commands.add_parser("evaluate", help="evaluate a run's best checkpoint on a split")
    evaluate.add_argument("--run-dir", required=True, help="run directory written by `engagerec train`")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    evaluate.add_argument("--json-out", help="also write the metrics to this JSON file")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's train.device")
    evaluate.set_defaults(handler=_evaluate)

    pred = commands.add_parser(
        "predict", help="score raw tables (the run's source layout) or a prepared split with a trained run"
    )
    pred.add_argument(
        "--run-dir",
        required=True,
        action="append",
        help="run directory written by `engagerec train`; repeat to average several runs (a seed ensemble)",
    )
    pred.add_argument(
        "--input",
        required=True,
        help="interaction rows in the run's source layout (file, directory or glob), or a prepared directory",
    )
    pred.add_argument("--out", required=True, help="output parquet file")
    pred.add_argument("--split", default="test", help="with a prepared directory: the split (default test)")
    pred.add_argument("--users", help="with raw input: the users table (default: the run's)")
    pred.add_argument("--content", help="with raw input: the content table (default: the run's)")
    pred.add_argument("--threshold", type=float, default=0.5, help="binary tasks' flag: probability >= this")
    pred.add_argument(
        "--batch-size", type=int, help="rows per batch and rank (default train.eval_batch_size)"
    )
    pred.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    pred.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's train.device")
    pred.add_argument("--json", action="store_true", help="also print the summary as JSON")
    pred.set_defaults(handler=_predict)

    export = commands.add_parser(
        "export", help="a run's checkpoint as one unsharded torch.export program (loads with torch alone)"
    )
    export.add_argument("--run-dir", required=True, help="run directory written by `engagerec train`")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--int8", action="store_true", help="also export row-wise int8 embedding tables")
    export.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    export.add_argument(
        "--check-split", default="test", choices=["train", "val", "test"], help="where quality is measured"
    )
    export.add_argument("--check-rows", type=int, default=200_000, help="at most this many rows of it")
    export.set_defaults(handler=_export)

    synth = commands.add_parser(
        "synthesize", help="write synthetic source tables (a config's generator, or KuaiRand-1K-shaped files)"
    )
    synth.add_argument("--config", help="a config whose data.source.synthetic says what to generate")
    synth.add_argument("--shape", choices=["kuairand-1k"], help="KuaiRand's official layout and sizes")
    synth.add_argument("--scale", type=float, default=1.0, help="with --shape: fraction of the real sizes")
    synth.add_argument("--seed", type=int, default=0, help="with --shape")
    synth.add_argument("--out", required=True)
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    synth.set_defaults(handler=_synthesize)
    describe = commands.add_parser("describe", help="parameter counts per embedding table, tower and head")
    describe.add_argument("--config", required=True)
    describe.add_argument("--data", help="prepared data directory (default prepared/<name>)")
    describe.add_argument(
        "--towers", help="comma-separated tower names, or 'all' (default: the config's tower)"
    )
    describe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    describe.set_defaults(handler=_describe)

    results = commands.add_parser(
        "results", help="regenerate docs/RESULTS.md and its figures (sections cached by what decides them)"
    )
    results.add_argument("--sections", help="comma-separated section names to compute (default all)")
    results.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of every section")
    results.add_argument("--fresh", action="store_true", help="recompute even the cached sections")
    results.add_argument("--out", default="docs/RESULTS.md")
    results.add_argument("--cache", default="docs/results", help="one JSON per section (the cache)")
    results.add_argument("--work", default="runs/results", help="prepared data and runs computed now")
    results.set_defaults(handler=_results)
    return parser


def quiet_library_noise() -> None:
    """Known, harmless deprecation chatter from torch / torchrec / fbgemm 1.6-1.8 on CPU."""
    for pattern in (
        ".*_get_pg_default_device.*",  # torchrec 1.6's object collectives
        ".*Multiple backends are registered.*",
        ".*broadcast_buffers.*",
        ".*ShardedTensor.*",
        ".*torch.meshgrid.*",
        ".*autograd kernel was not registered.*",
        ".*is_fx_tracing.*",
        ".*TypedStorage.*",
        ".*HeuristicalStorageReservation.*",  # the planner's default storage estimate, torchrec 1.8
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger().setLevel(logging.ERROR)  # "Sharding spec not found" for data-parallel tables
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing, once per trace


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``).

    Returns:
        int: the handler's exit status (0 on success), or 2 after printing engagerec's own error
        (configuration, data, checkpoint, training) to stderr: a message, not a traceback. Any
        other exception is a bug and propagates with its traceback.
    """
    quiet_library_noise()
    keep_freed_memory()  # CPU steps stop page-faulting their activations in (engagerec.host_memory)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        TrainingError,
    ) as err:  # anything else is a bug: a traceback
        print(f"engagerec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # a package an extra installs: one line naming the extra
        message = missing_extra(err, f"engagerec {args.command}")
        if message is None:
            raise
        print(f"engagerec {args.command}: error: {message}", file=sys.stderr)
        return 2
