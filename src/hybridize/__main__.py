"""`python -m hybridize` runs the command line."""

from .cli import run

run()
