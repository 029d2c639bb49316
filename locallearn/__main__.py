"""``python -m locallearn`` (and ``torchrun -m locallearn``): the command-line interface."""

from locallearn.cli import entry

entry()
