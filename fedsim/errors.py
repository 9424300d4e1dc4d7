"""Errors that reach the user as one line and an exit status, never as a traceback.

Exit statuses: 2 a problem the user can fix before running (config, data, folders), 3 the
training diverged, 4 the run stopped making progress toward its end, 130 interrupted.
"""
from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """The first line of `exc`'s message ('' for an empty one), cut to `limit` characters
    (None: whole), for one-line reports."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


class FedsimError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits with `exit_code`."""

    exit_code = 2


class ConfigError(FedsimError):
    """A bad configuration value, reported with the dotted key path that holds it."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DataError(FedsimError):
    """A dataset that is missing or not in the format it claims to be."""


class DivergenceError(FedsimError):
    """Training diverged: NaN or inf in an update or the test loss, or a test loss that stays
    far above its initial value (`fedsim.divergence`); says where it happened."""

    exit_code = 3


class NoProgressError(FedsimError):
    """The run stopped moving toward its end (`fedsim.stall`): jobs that never complete a
    round or move the clock, or no job for a long virtual time; a checkpoint is written."""

    exit_code = 4


class ClientJobError(FedsimError):
    """User code raised inside a client's local update; names the client and keeps the traceback."""

    def __init__(self, client: int, job_id: int, detail: str):
        self.client = client
        self.job_id = job_id
        self.detail = detail
        super().__init__(f"client {client} (job {job_id}) failed in its local update:\n{detail}")


class StepAbandoned(FedsimError):
    """A step gave up waiting for its jobs, so it did not happen: a signal asked the run to
    stop (`signal` holds its number), or the workers cannot run the jobs (none can be placed,
    none answers, or they died too often). The runner turns it into the run's last line and
    writes a checkpoint where the protocol's state allows (fedsim.runner). Exit status 5:
    nothing is wrong with the config; resume once the workers are back."""

    exit_code = 5

    def __init__(self, message: str, signal: int | None = None):
        super().__init__(message)
        self.signal = signal


class Interrupted(FedsimError):
    """The run was stopped by SIGINT/SIGTERM after writing a checkpoint."""

    exit_code = 130
