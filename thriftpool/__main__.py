"""``python -m thriftpool``: the command-line tool (see :mod:`thriftpool.cli`)."""

import sys

from .cli import main

sys.exit(main())
