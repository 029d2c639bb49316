"""``python -m locallearn`` (and ``torchrun -m locallearn``): the command-line interface."""

import sys

from locallearn.cli import main

sys.exit(main())
