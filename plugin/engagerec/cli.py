"""`engagerec <command>`: parses the arguments and calls one function per command
(engagerec.commands). Other packages add commands through the engagerec.commands entry points
(a Command each), as the study does: compare, refit, results."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, List, Optional

from engagerec import commands
from engagerec.data.errors import DataError
from engagerec.errors import CheckpointError, ConfigError, TrainingError
from engagerec.extras import missing_extra
from engagerec.host_memory import keep_freed_memory

COMMAND_GROUP = "engagerec.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand that another package adds to ``engagerec``: an entry point of the
    ``engagerec.commands`` group names one (``compare = "engagerec_study.commands:compare"``), and
    the entry point's name is the command's. Its module should import only what defining the
    arguments needs, so that ``engagerec --help`` lists it whatever is installed; ``run`` imports
    the rest when it runs.

    Args:
        help: the line ``engagerec --help`` shows for it.
        add_arguments: adds its arguments to its parser.
        run: the parsed arguments -> the exit status (one call into the package that defines it).
            An ImportError of a package an extra installs (``engagerec.extras``) becomes one line
            naming the extra, as for engagerec's own commands.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _prepare(args: argparse.Namespace) -> int:
    if args.verify is not None:
        if args.config or args.out or args.set or args.base:
            raise ConfigError(
                "prepare --verify DIR checks a preparation: give it no --config, --out, --set or --base"
            )
        return commands.verify(args.verify, as_json=args.json)
    if not args.config:
        raise ConfigError("prepare needs --config (or --verify DIR to check a preparation)")
    return commands.prepare(args.config, args.set, args.out, as_json=args.json, base=args.base)


def _train(args: argparse.Namespace) -> int:
    # quoted: a run named like a date or a number stays a path, not a YAML value
    overrides = args.set + ([f"train.init_from={json.dumps(args.init_from)}"] if args.init_from else [])
    return commands.train(
        args.config,
        overrides,
        args.out,
        resume=not args.no_resume,
        allow_config_change=args.allow_config_change,
        verify_data=args.verify_data,
    )


def _evaluate(args: argparse.Namespace) -> int:
    return commands.evaluate(args.run_dir, args.split, args.checkpoint, args.device, args.json_out)


def _predict(args: argparse.Namespace) -> int:
    return commands.predict(
        args.run_dir,
        args.input,
        args.out,
        as_json=args.json,
        split=args.split,
        users=args.users,
        content=args.content,
        threshold=args.threshold,
        batch_size=args.batch_size,
        checkpoint_name=args.checkpoint,
        device=args.device,
    )


def _serve(args: argparse.Namespace) -> int:
    from engagerec.serve import serve

    return serve(
        args.export,
        host=args.host,
        port=args.port,
        max_rows=args.max_rows,
        max_batch=args.max_batch,
        batch_timeout=args.batch_timeout,
        max_in_flight=args.max_in_flight,
        workers=args.workers,
    )


def _export(args: argparse.Namespace) -> int:
    return commands.export(
        args.run_dir,
        args.out,
        int8=args.int8,
        aoti=args.aoti,
        checkpoint_name=args.checkpoint,
        check_split=args.check_split,
        check_rows=args.check_rows,
    )


def _synthesize(args: argparse.Namespace) -> int:
    return commands.synthesize(
        args.out, args.config, args.set, args.shape, args.scale, args.seed, args.popularity_skew, args.videos,
        args.video_arrival, args.user_arrival,
    )  # fmt: skip


def _describe(args: argparse.Namespace) -> int:
    return commands.describe(
        args.config, args.set, args.towers.split(",") if args.towers else None, args.data
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``engagerec`` parser: one subcommand per job, each with its handler as ``handler``."""
    parser = argparse.ArgumentParser(prog="engagerec", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)

    prep = subcommands.add_parser(
        "prepare", help="tables -> labelled, split, encoded parquet shards + schema.json"
    )
    prep.add_argument("--config", help="the config whose data to prepare")
    prep.add_argument("--out", help="output directory (default prepared/<name>)")
    prep.add_argument(
        "--verify",
        metavar="DIR",
        help="prepare nothing: check the preparation in DIR against its manifest (every file's size "
        "and CRC-32, every shard's rows)",
    )
    prep.add_argument(
        "--base",
        metavar="DIR",
        help="an earlier preparation of this config that the source's rows (the log's next window) "
        "continue: its vocabularies grow, its normalisation stays, its id statistics and histories carry on",
    )
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    prep.add_argument("--json", action="store_true", help="also print the summary as JSON")
    prep.set_defaults(handler=_prepare)

    train = subcommands.add_parser("train", help="train one model (1 process, or under torchrun)")
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
    train.add_argument(
        "--verify-data",
        action="store_true",
        help="check every file of the prepared data against its CRC-32 before training "
        "(sizes and rows are always checked)",
    )
    train.add_argument(
        "--init-from",
        metavar="RUN",
        help="a warm start: begin from this run's best checkpoint (its model and optimiser state) "
        "instead of a fresh initialisation; sets train.init_from",
    )
    train.set_defaults(handler=_train)

    evaluate = subcommands.add_parser("evaluate", help="evaluate a run's best checkpoint on a split")
    evaluate.add_argument("--run-dir", required=True, help="run directory written by `engagerec train`")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    evaluate.add_argument("--json-out", help="also write the metrics to this JSON file")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's train.device")
    evaluate.set_defaults(handler=_evaluate)

    pred = subcommands.add_parser(
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

    export = subcommands.add_parser(
        "export", help="a run's checkpoint as one unsharded torch.export program (loads with torch alone)"
    )
    export.add_argument("--run-dir", required=True, help="run directory written by `engagerec train`")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--int8", action="store_true", help="also export row-wise int8 embedding tables")
    export.add_argument(
        "--aoti",
        action="store_true",
        help="also compile the raw-values fp32 program with AOTInductor (model_raw_fp32.aoti.pt2), "
        "which C++ loads (clients/cpp/score_raw.cpp, make cpp-client); about a minute",
    )
    export.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    export.add_argument(
        "--check-split", default="test", choices=["train", "val", "test"], help="where quality is measured"
    )
    export.add_argument("--check-rows", type=int, default=200_000, help="at most this many rows of it")
    export.set_defaults(handler=_export)

    serve = subcommands.add_parser(
        "serve", help="score JSON rows of raw values over HTTP with an export's raw program (LitServe)"
    )
    serve.add_argument("--export", required=True, help="an `engagerec export` directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-rows", type=int, default=4096, help="rows a request may hold (more: 413)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests a worker scores together")
    serve.add_argument(
        "--batch-timeout", type=float, default=0.005, help="seconds a worker waits to fill a batch"
    )
    serve.add_argument(
        "--max-in-flight", type=int, default=256, help="requests in flight before it sheds with 503"
    )
    serve.add_argument("--workers", type=int, default=1, help="inference processes")
    serve.set_defaults(handler=_serve)

    synth = subcommands.add_parser(
        "synthesize", help="write synthetic source tables (a config's generator, or KuaiRand-1K-shaped files)"
    )
    synth.add_argument("--config", help="a config whose data.source.synthetic says what to generate")
    synth.add_argument("--shape", choices=["kuairand-1k"], help="KuaiRand's official layout and sizes")
    synth.add_argument("--scale", type=float, default=1.0, help="with --shape: fraction of the real sizes")
    synth.add_argument("--seed", type=int, default=0, help="with --shape")
    synth.add_argument(
        "--popularity-skew",
        type=float,
        help="with --shape: the exponent of the videos' popularity power law (default 1.05, about 1.9M "
        "distinct videos at scale 1; 1.3 a stronger head, about 1.1M; 0.65 flatter, about 3.2M)",
    )
    synth.add_argument(
        "--videos", type=int, help="with --shape: the catalogue's size (default 4,369,953 x scale)"
    )
    synth.add_argument(
        "--video-arrival",
        type=float,
        help="with --shape: the share of the catalogue uploaded during the log's 31 days, each video "
        "viewed only from its upload on (default 0: all before; a growing catalogue for retraining)",
    )
    synth.add_argument(
        "--user-arrival",
        type=float,
        help="with --shape: the share of users who join during the log's 31 days, each viewing only "
        "from the join on (default 0: all before; new users every day for retraining)",
    )
    synth.add_argument("--out", required=True)
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    synth.set_defaults(handler=_synthesize)
    describe = subcommands.add_parser("describe", help="parameter counts per embedding table, tower and head")
    describe.add_argument("--config", required=True)
    describe.add_argument("--data", help="prepared data directory (default prepared/<name>)")
    describe.add_argument(
        "--towers", help="comma-separated tower names, or 'all' (default: the config's tower)"
    )
    describe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    describe.set_defaults(handler=_describe)

    for entry in entry_points(group=COMMAND_GROUP):
        if entry.name not in subcommands.choices:  # engagerec's own commands keep their names
            _add_entry_point(subcommands, entry)
    return parser


def _add_entry_point(subcommands: argparse._SubParsersAction, entry: EntryPoint) -> None:
    """Add the ``Command`` an entry point names; one that cannot be loaded is listed as such and
    refuses in one line when run (the other commands keep working)."""
    try:
        command = entry.load()
    except ImportError as err:
        reason = f"cannot be loaded ({entry.value}: {err})"
        unavailable = subcommands.add_parser(entry.name, help=reason, add_help=False)
        unavailable.set_defaults(handler=_unavailable, reason=reason)
        return
    parser = subcommands.add_parser(entry.name, help=command.help)
    command.add_arguments(parser)
    parser.set_defaults(handler=command.run)


def _unavailable(args: argparse.Namespace) -> int:
    print(f"engagerec {args.command} {args.reason}", file=sys.stderr)
    return 2


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


def _message(err: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker comes back re-raised by torch
    with the worker's traceback as its text: its last line holds the message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.partition(f"{type(err).__name__}: ")[2] or last
    return text


def run() -> None:
    """The ``engagerec`` program: runs ``main`` on ``sys.argv`` and exits with its status.

    A rank that torchrun started beside others ends without the interpreter's teardown, once
    its exit handlers have run and its output (Python's and C's) is flushed. Rarely, under load,
    a rank aborted in that teardown after its work was done ("terminate called without an
    active exception": a SIGABRT that torchrun reports as the whole job's failure; which C++
    destructor aborts is not known). Everything a command writes is closed before ``main``
    returns, so nothing is lost by skipping it. A library caller's own process is left alone.

    Example::

        $ torchrun --nproc-per-node 2 -m engagerec train --config configs/kuairand_ple.yaml
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()  # logging, multiprocessing children, temporary files
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)  # C stdio buffers of the libraries (C++ logging to a pipe)
        os._exit(code)
    sys.exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: the command line without the program's name.

    Returns:
        int: the handler's exit status (0 on success), or 2 after printing one line to stderr,
        not a traceback: engagerec's own error (configuration, data, checkpoint, training), or
        the extra to install when a command misses a package of one (``engagerec.extras``). Any
        other exception is a bug and propagates with its traceback.
    """
    quiet_library_noise()
    keep_freed_memory()  # CPU steps stop page-faulting their activations in (engagerec.host_memory)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.handler is not _unavailable:  # which refuses whatever it is given
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        TrainingError,
    ) as err:  # anything else is a bug: a traceback
        print(f"engagerec {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except ImportError as err:  # a package an extra installs: one line naming the extra
        message = missing_extra(err, f"engagerec {args.command}")
        if message is None:
            raise
        print(f"engagerec {args.command}: error: {message}", file=sys.stderr)
        return 2
