"""`python -m fedsim` is the `fedsim` command."""
import sys

from .cli import console

sys.exit(console())
