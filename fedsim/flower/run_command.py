"""``fedsim flower-run``: ``flwr run`` whose exit status says how the run ended.

Flower 1.42's ``flwr run`` submits the run, streams its log and exits 0 whatever the run's
outcome. `flower_run` runs ``flwr run ARGS --stream`` (its output passes through unchanged),
reads the run id it prints, asks ``flwr ls CONNECTION --run-id ID --format json`` for the
run's status and returns 0 for ``finished:completed``; any other end (``finished:failed``,
``finished:stopped``) raises FedsimError with the status and Flower's status details (a
fedsim ServerApp's one-line reason) as one line.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import FedsimError

RUN_ID = re.compile(r"(?:Successfully started run |run_id `|\"run-id\": \")(\d+)")  # text or --format json


class RunFailed(FedsimError):
    """A Flower run that ended other than ``finished:completed``."""

    exit_code = 1


def flwr_command() -> str:
    """Returns the ``flwr`` next to this Python (a virtual environment's), else ``flwr`` on PATH."""
    here = Path(sys.executable).with_name("flwr")
    return str(here) if here.exists() else "flwr"


def connection(args: Sequence[str]) -> list[str]:
    """Returns ``flwr run``'s SuperLink connection argument among `args` (the second
    positional one, after the app), as a list of zero or one item."""
    positional = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = "=" not in a and a not in ("--stream",)  # every other option of flwr run takes a value
        else:
            positional.append(a)
    return positional[1:2]


def run_status(run_id: str, where: list[str], wait: float = 60.0) -> dict:
    """Returns the run's entry of ``flwr ls --format json`` once it has finished (waits up
    to `wait` s for that); raises FedsimError if flwr ls fails or does not know the run."""
    deadline = time.monotonic() + wait
    while True:
        res = subprocess.run([flwr_command(), "ls", *where, "--run-id", run_id, "--format", "json"],
                             capture_output=True, text=True, timeout=120)
        try:
            runs = json.loads(res.stdout)["runs"]
        except (ValueError, KeyError, TypeError):
            raise FedsimError(f"flwr ls could not tell the status of run {run_id}: "
                              f"{(res.stdout + res.stderr).strip().splitlines()[-1:] or 'no output'}") from None
        got = next((r for r in runs if str(r.get("run-id")) == run_id), None)
        if got is None:
            raise FedsimError(f"flwr ls does not know run {run_id}")
        if str(got.get("status", "")).startswith("finished") or time.monotonic() >= deadline:
            return got
        time.sleep(1.0)


def flower_run(args: Sequence[str]) -> int:
    """Runs ``flwr run ARGS --stream``; returns 0 when the run completed, raises RunFailed
    (or FedsimError when the run could not be started or its status read) otherwise."""
    args = list(args)
    cmd = [flwr_command(), "run", *args, *([] if "--stream" in args else ["--stream"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if run_id is None and (found := RUN_ID.search(line)):
            run_id = found.group(1)
    code = proc.wait()
    sys.stdout.flush()
    if run_id is None:
        raise FedsimError(f"flwr run started no run (exit {code})")
    got = run_status(run_id, connection(args))
    status = got.get("status", "")
    if status != "finished:completed":
        details = " ".join(str(got.get("status-details", "")).split())
        raise RunFailed(f"Flower run {run_id} {status}" + (f": {details}" if details else ""))
    return 0
