import sys

from engagerec.cli import main

sys.exit(main())
