"""The serial executor: runs each job in-process when its result is asked for."""
from __future__ import annotations

from ..registry import EXECUTORS
from typing import Sequence

from ..contributions import Contributions, from_outputs
from ..errors import ClientJobError
from ..strategy import Strategy
from .base import Executor, Job, OnClientError, Worker, WorkerSpec


class SerialExecutor(Executor):
    """In-process, one job at a time; results are computed lazily on `result`."""

    def __init__(self, on_client_error: str = "stop") -> None:
        self.on_client_error = on_client_error
        self._worker: Worker | None = None
        self._pending: dict[int, Job] = {}

    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        self._worker = Worker(spec, strategy)

    def submit(self, job: Job) -> None:
        self._pending[job.job_id] = job

    def result(self, job_id: int) -> Contributions:
        if self._worker is None:
            raise RuntimeError("executor not started")
        job = self._pending.pop(job_id)
        return self.contribution(job, self._worker.attempt(job))

    def run(self, jobs: Sequence[Job]) -> Contributions:
        """Runs the jobs one after another and stacks their outputs (failed ones left out on 'drop')."""
        if self._worker is None:
            raise RuntimeError("executor not started")
        done, outputs = [], []
        for job in jobs:
            out = self._worker.attempt(job)
            if isinstance(out, str):
                if self.on_client_error == "stop":
                    raise ClientJobError(job.client, job.job_id, out)
                continue
            done.append(job)
            outputs.append(out)
        return from_outputs(done, outputs)

    def discard(self, job_id: int) -> None:
        self._pending.pop(job_id, None)


@EXECUTORS.register("serial")
def serial(on_client_error: OnClientError = "stop") -> Executor:
    """Runs every client job in the driver process, one after another.

    Args:
        on_client_error: When a client's training code raises: 'stop' ends the run with the
            client id and the original traceback; 'drop' treats that client as dropped out.
    """
    return SerialExecutor(on_client_error)
