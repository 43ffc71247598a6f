"""``python -m engagerec``: the same command line as ``engagerec``."""

from engagerec.cli import run

run()
