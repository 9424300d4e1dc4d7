"""`python -m fedsim` is the `fedsim` command."""
import sys

from .cli import main

sys.exit(main())
