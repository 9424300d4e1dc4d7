"""The executor contract: jobs in, results out, in any order; the protocol orders them.

A job is "run this client's local update from model version v on these sample indices".
Jobs submitted at the same virtual moment are independent, so an executor may run them in
parallel (Ray actors) or together (vmap); the protocol consumes results in virtual-time
order, which is what makes results independent of the executor.
"""
from __future__ import annotations

import inspect
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Sequence

import numpy as np
import torch

from ..config.checks import OneOf
from ..config.components import Component
from ..data.batching import gather_batches
from ..errors import ClientJobError
from ..rng import key
from ..state_types import checkpointable
from ..strategy import ClientOutput, LocalHP, Payload, Strategy, Tensor
from ..task import Task

if TYPE_CHECKING:
    from ..config.load import Config

ON_CLIENT_ERROR = ("stop", "drop")
OnClientError = Annotated[str, OneOf(ON_CLIENT_ERROR)]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1.5 µs more to build, per job
class Job:
    """One client's local update to run (treat as read-only; `dataclasses.replace` makes variants)."""

    job_id: int  # global dispatch counter; keys the job's randomness
    client: int
    version: int  # server model version (or round) the payload belongs to
    payload: Payload
    state: dict[str, Tensor]  # the client's persistent state ({} if stateless)
    indices: np.ndarray  # [K, B] sample indices into the shared train set, −1 = padding
    num_samples: int  # n_i, the client's training-set size

    @property
    def num_steps(self) -> int:
        return int(self.indices.shape[0])


@checkpointable
@dataclass(slots=True)
class JobResult:
    """What came back from a job: its output, or (with on_client_error='drop') the error (read-only)."""

    job_id: int
    client: int
    version: int
    output: ClientOutput | None
    num_samples: int
    num_steps: int
    error: str | None = None  # traceback of the user code that failed; output is then None

    @property
    def failed(self) -> bool:
        """True when the client's code raised; protocols treat the client as dropped."""
        return self.error is not None


@dataclass
class WorkerSpec:
    """Everything a worker needs to run jobs; picklable (Ray ships it once per actor)."""

    task: Task
    x_train: Tensor
    y_train: Tensor
    strategy: Component
    hp: LocalHP
    seed: int


class Worker:
    """Runs jobs in the current process: gathers batches, calls the strategy's local update."""

    def __init__(self, spec: WorkerSpec, strategy: Strategy | None = None):
        self.spec = spec
        self.strategy = strategy if strategy is not None else spec.strategy.build()

    def run(self, job: Job) -> JobResult:
        """Runs one job and returns its detached result; user errors become ClientJobError."""
        result = self.attempt(job)
        if result.error is not None:
            raise ClientJobError(job.client, job.job_id, result.error)
        return result

    def attempt(self, job: Job) -> JobResult:
        """Runs one job; an exception in user code is returned as a failed result (with its
        traceback) instead of being raised."""
        spec = self.spec
        batches = gather_batches(spec.x_train, spec.y_train, job.indices)
        try:
            with torch.random.fork_rng(devices=[]):
                # stochastic layers (dropout); CPU generator only — fork_rng restores only that one,
                # and torch.manual_seed would also queue a lazy CUDA seed (≈0.2 ms per job)
                torch.default_generator.manual_seed(key(spec.seed, "job", job.job_id))
                out = self.strategy.local(job.payload, job.state, batches, spec.task.grad_fn, spec.hp)
        except Exception:  # noqa: BLE001 - user code: keep the original traceback
            return JobResult(job.job_id, job.client, job.version, None, job.num_samples, job.num_steps,
                             error=traceback.format_exc())
        out = ClientOutput(
            out.update.detach(),
            {k: v.detach() for k, v in out.state.items()},
            {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.extras.items()},
            {k: float(v) for k, v in out.metrics.items()},
        )
        return JobResult(job.job_id, job.client, job.version, out, job.num_samples, job.num_steps)


class Executor(ABC):
    """Runs jobs somewhere; `result` may be called in any order for submitted jobs.

    `on_client_error` says what a job whose user code raised becomes: 'stop' raises
    ClientJobError (client id + original traceback), 'drop' returns it as a failed result,
    which protocols treat like a client that dropped out.
    """

    on_client_error: str = "stop"

    def checked(self, result: JobResult) -> JobResult:
        """Applies `on_client_error` to a result and returns it (raises ClientJobError on 'stop')."""
        if result.error is not None and self.on_client_error == "stop":
            raise ClientJobError(result.client, result.job_id, result.error)
        return result

    @abstractmethod
    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        """Prepares workers (ships the task, data and strategy once)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queues a job; it may start running at once."""

    @abstractmethod
    def result(self, job_id: int) -> JobResult:
        """Blocks until the result of a submitted job is available and returns it."""

    def discard(self, job_id: int) -> None:
        """Forgets a submitted job whose result will not be needed (default: fetch and drop)."""
        self.result(job_id)

    model_device: torch.device | None = None  # where the runner keeps the model (None: CPU)

    def evaluate(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float | None]:
        """Evaluates `params` on (x, y) where this executor computes (default: in-process,
        `Task.evaluate`); returns Task.evaluate's metrics."""
        return task.evaluate(params, x, y, batch_size)

    def run(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Submits all jobs and returns their results in the jobs' order."""
        for job in jobs:
            self.submit(job)
        return [self.result(job.job_id) for job in jobs]

    def close(self) -> None:
        """Stops workers and frees resources."""


def build_executor(config: "Config") -> Executor:
    """Builds `config.executor`. A factory whose first parameter is `ctx` is given the whole
    Config (the Ray executor reads the `ray` section and the plugins from it)."""
    params = list(inspect.signature(config.executor.entry.factory).parameters)
    return config.executor.build(config) if params[:1] == ["ctx"] else config.executor.build()
