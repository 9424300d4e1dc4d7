"""The executor contract: jobs in, results out, in any order; the protocol orders them.

A job is "run this client's local update from model version v on these sample indices".
Jobs submitted at the same virtual moment are independent, so an executor may run them in
parallel (Ray actors) or together (vmap); the protocol consumes results in virtual-time
order, which is what makes results independent of the executor.
"""
from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..config.components import Component
from ..data.batching import gather_batches
from ..errors import ClientJobError
from ..rng import key
from ..strategy import ClientOutput, LocalHP, Payload, Strategy, Tensor
from ..task import Task


@dataclass(frozen=True)
class Job:
    """One client's local update to run."""

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


@dataclass(frozen=True)
class JobResult:
    """What came back from a job."""

    job_id: int
    client: int
    version: int
    output: ClientOutput
    num_samples: int
    num_steps: int


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
        spec = self.spec
        batches = gather_batches(spec.x_train, spec.y_train, job.indices)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key(spec.seed, "job", job.job_id))  # stochastic layers (dropout)
                out = self.strategy.local(job.payload, job.state, batches, spec.task.grad_fn, spec.hp)
        except Exception:  # noqa: BLE001 - user code: keep the original traceback
            raise ClientJobError(job.client, job.job_id, traceback.format_exc()) from None
        out = ClientOutput(
            out.update.detach(),
            {k: v.detach() for k, v in out.state.items()},
            {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.extras.items()},
            {k: float(v) for k, v in out.metrics.items()},
        )
        return JobResult(job.job_id, job.client, job.version, out, job.num_samples, job.num_steps)


class Executor(ABC):
    """Runs jobs somewhere; `result` may be called in any order for submitted jobs."""

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
