"""A stop asked for by SIGINT/SIGTERM, seen by code that waits on other processes.

The runner stops a run between steps. A step that waits on other processes (the Ray
executor on its actors) may wait as long as they take, for ever if they are lost; such a
wait is made of short waits with `check` between them. Once the runner has called
`request`, `check` raises StepAbandoned and the step ends at once. The runner requests it
only for protocols whose state a waiting step has not changed yet, so that the run can
still be checkpointed (fedsim.runner).
"""
from __future__ import annotations

from .errors import StepAbandoned

_requested: list[int] = []  # the signal that asked for a stop, if any (process-wide, like signals)


def request(signum: int) -> None:
    """Asks every waiting step to give up (see the module docstring)."""
    _requested[:] = [signum]


def clear() -> None:
    """Withdraws the request (the run it was for has ended)."""
    _requested.clear()


def check() -> None:
    """Raises StepAbandoned, carrying the signal, when a stop was requested."""
    if _requested:
        raise StepAbandoned("stopped by a signal while waiting for jobs", signal=_requested[0])
