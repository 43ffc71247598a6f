"""The study's ``engagerec`` commands (compare, refit, results), added to the CLI by the
``engagerec.commands`` entry points in pyproject.toml. This module imports nothing of the study
extra (scikit-learn, scipy, matplotlib), so ``engagerec --help`` lists the commands wherever the
library is installed; each command checks for those packages before any work, and the CLI turns
a missing one into one line naming the extra (engagerec.extras)."""

from __future__ import annotations

import argparse
import importlib.util

from engagerec.cli import Command

# what the study imports beyond the library's data extra, by import name: each command needs
# them (the report's statistics and plots, the GBDT); checked first, so no run trains for an hour
# and then fails
EXTRA_MODULES = ("sklearn", "scipy", "matplotlib")


def require_extra() -> None:
    """Raise for the first of the study's packages that is not installed.

    Raises:
        ModuleNotFoundError: naming the missing package (``name``), which the CLI reports as
            the extra to install.
    """
    for module in EXTRA_MODULES:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)


def _positive(text: str) -> int:
    """An argument that must be a whole number above 0.

    Example::

        >>> _positive("300000")
        300000
    """
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of rows above 0, got {value}")
    return value


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--towers", help="comma-separated (default: the config's tower)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--out", help="output directory (default runs/<name>/compare)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument(
        "--gbdt", action="store_true", help="add the scikit-learn GBDT reference (target-encoded ids)"
    )
    parser.add_argument(
        "--reference", help="the model the others are paired with by seed (default: the GBDT, else the first)"
    )
    parser.add_argument(
        "--gbdt-rows",
        type=_positive,
        help="fit the GBDT on a seeded sample of this many training rows (default all; at millions of "
        "rows its time grows with them)",
    )


def _compare(args: argparse.Namespace) -> int:
    require_extra()
    from engagerec_study.compare import compare as run

    return run(
        args.config,
        args.set,
        args.towers.split(",") if args.towers else None,
        [int(s) for s in args.seeds.split(",")],
        args.out,
        resume=not args.no_resume,
        gbdt=args.gbdt,
        reference=args.reference,
        gbdt_rows=args.gbdt_rows,
    )


def _refit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the chosen run (written by `engagerec train`)")
    parser.add_argument(
        "--data-dir",
        help="its data without validation rows (default: the run's data directory + _refit, e.g. "
        "prepared/<name>_refit; prepared when absent, refused when it holds other data)",
    )
    parser.add_argument("--out", help="the refit run's directory (default: <run-dir>_refit beside it)")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the refit's data, then stop")


def _refit(args: argparse.Namespace) -> int:
    require_extra()
    from engagerec_study.refit import refit

    return refit(args.run_dir, args.data_dir, args.out, prepare_only=args.prepare_only)


def _results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", help="comma-separated section names to compute (default all)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of every section")
    parser.add_argument("--fresh", action="store_true", help="recompute even the cached sections")
    parser.add_argument("--out", default="docs/RESULTS.md")
    parser.add_argument(
        "--cache", default="docs/section_cache", help="the section cache: one JSON per section"
    )
    parser.add_argument("--work", default="runs/sections", help="prepared data and runs computed now")


def _results(args: argparse.Namespace) -> int:
    require_extra()
    from engagerec_study.sections.document import results

    return results(
        args.out,
        args.cache,
        args.work,
        sections=args.sections.split(",") if args.sections else None,
        seeds=[int(s) for s in args.seeds.split(",")],
        fresh=args.fresh,
    )


compare = Command(
    help="train several towers x seeds; markdown + JSON + plot",
    add_arguments=_compare_arguments,
    run=_compare,
)
refit = Command(
    help="train a chosen run again on its training and validation rows together, for the epochs "
    "its validation chose (the same test rows)",
    add_arguments=_refit_arguments,
    run=_refit,
)
results = Command(
    help="regenerate docs/RESULTS.md and its figures (sections cached by what decides them)",
    add_arguments=_results_arguments,
    run=_results,
)
