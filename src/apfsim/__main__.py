"""``python -m apfsim``."""

import sys

from apfsim.cli import main

sys.exit(main())
