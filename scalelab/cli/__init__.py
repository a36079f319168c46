"""The ``scalelab`` command line: main.py builds the parser; each module here holds one stage's sub-commands."""

from scalelab.cli.main import main

__all__ = ["main"]
