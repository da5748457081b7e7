"""`python -m export.tensorrt`: the engine builder's command line (export/tensorrt/cli.py), also
`python -m export engine`."""

import sys

from export.tensorrt.cli import main

sys.exit(main())
