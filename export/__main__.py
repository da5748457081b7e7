"""Entry point for `python -m export`."""

import sys

from export.export import main

sys.exit(main())
