"""``python -m recforge``: the ``recforge`` command, for environments where its script is not on the path."""

import sys

from recforge.cli import main

sys.exit(main())
