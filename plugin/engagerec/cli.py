"""`engagerec <command>`: thin wrappers over the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from engagerec.config import ConfigError, load_config
from engagerec.data.errors import DataError


def _prepare(args: argparse.Namespace) -> int:
    from engagerec.data.prepare import format_summary, prepare

    cfg = load_config(args.config, args.set)
    out = args.out or f"prepared/{cfg.name}"
    summary = prepare(cfg.data, out)
    print(format_summary(summary, out))
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from engagerec.data.synthetic import write_mmoe_prepared, write_study_tables

    cfg = load_config(args.config, args.set)
    synthetic = cfg.data.source.synthetic
    if synthetic.kind == "mmoe":
        path = write_mmoe_prepared(args.out, synthetic, cfg.data)
    else:
        path = write_study_tables(args.out, synthetic)
    print(f"wrote {synthetic.num_rows:,} synthetic rows ({synthetic.kind}) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engagerec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="tables -> labelled, split, encoded parquet shards + schema.json")
    prep.add_argument("--config", required=True)
    prep.add_argument("--out", help="output directory (default prepared/<name>)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    prep.add_argument("--json", action="store_true", help="also print the summary as JSON")
    prep.set_defaults(run=_prepare)

    synth = commands.add_parser("synthesize", help="write synthetic data (study tables or MMoE shards)")
    synth.add_argument("--config", required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    synth.set_defaults(run=_synthesize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataError) as err:
        print(f"engagerec {args.command}: error: {err}", file=sys.stderr)
        return 2
