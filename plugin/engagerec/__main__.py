"""``python -m engagerec``: the same command line as ``engagerec``."""

import sys

from engagerec.cli import main

sys.exit(main())
