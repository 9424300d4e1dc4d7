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
from ..augment import Augment, apply, job_draws
from ..data.batching import gather_batches
from ..errors import ClientJobError
from ..rng import cuda_index, key, keyed_torch
from ..contributions import Contributions, from_outputs
from ..state_types import checkpointable
from ..strategy import ClientOutput, LocalHP, Payload, Strategy, Tensor, split_job_hp
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
    indices: np.ndarray  # [K, B] sample indices into the shared train set, −1 = padding (or DeferredIndices:
    # left to an executor that computes hashed orders on its device; np.asarray gives the array)
    num_samples: int  # n_i, the client's training-set size

    @property
    def num_steps(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class WorkerSpec:
    """Everything a worker needs to run jobs; picklable (Ray ships it once per actor)."""

    task: Task
    x_train: Tensor
    y_train: Tensor
    strategy: Component
    hp: LocalHP
    seed: int
    num_clients: int = 0  # the population size N
    augment: Augment = Augment()  # training-time crop and flip (fedsim.augment)


class Worker:
    """Runs jobs in the current process: gathers batches, calls the strategy's local update."""

    def __init__(self, spec: WorkerSpec, strategy: Strategy | None = None):
        self.spec = spec
        self.strategy = spec.task.prepare(strategy if strategy is not None else spec.strategy.build())

    def run(self, job: Job) -> ClientOutput:
        """Runs one job and returns its detached output; user errors become ClientJobError."""
        out = self.attempt(job)
        if isinstance(out, str):
            raise ClientJobError(job.client, job.job_id, out)
        return out

    def attempt(self, job: Job) -> ClientOutput | str:
        """Runs one job and returns its detached output; an exception in user code is
        returned as its traceback (a str) instead of being raised."""
        spec = self.spec
        batches = gather_batches(spec.x_train, spec.y_train, job.indices)
        if spec.augment.active:
            draws = torch.from_numpy(job_draws(spec.augment, spec.seed, job.client, job.job_id, *job.indices.shape))
            batches = batches._replace(x=apply(batches.x, draws, spec.augment.crop_padding))
        try:
            # random layers (dropout) draw from the job's key, on the CPU and the data's CUDA device
            with keyed_torch(key(spec.seed, "job", job.job_id), cuda_index(spec.x_train.device)):
                hp, extras = split_job_hp(spec.hp, job.payload.extras)  # a job's own lr/momentum/weight decay
                payload = job.payload if extras is job.payload.extras else Payload(job.payload.params, extras)
                out = self.strategy.local(payload, job.state, batches, spec.task.step_grad_fn, hp)
        except Exception:  # noqa: BLE001 - user code: keep the original traceback
            return traceback.format_exc()
        return ClientOutput(
            out.update.detach(),
            {k: v.detach() for k, v in out.state.items()},
            {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.extras.items()},
            {k: float(v) for k, v in out.metrics.items()},
        )


class Executor(ABC):
    """Runs jobs somewhere and returns their `Contributions`; `result` may be called in any
    order for submitted jobs.

    `on_client_error` says what a job whose user code raised becomes: 'stop' raises
    ClientJobError (client id + original traceback), 'drop' leaves its row out (`result`
    returns no row), which protocols treat like a client that dropped out.
    """

    on_client_error: str = "stop"

    def contribution(self, job: Job, outcome: ClientOutput | str) -> Contributions:
        """Returns the one-row contributions of `job`'s outcome (a ClientOutput, or the
        traceback of its failed user code: raised as ClientJobError on 'stop', no row on 'drop')."""
        if isinstance(outcome, str):
            if self.on_client_error == "stop":
                raise ClientJobError(job.client, job.job_id, outcome)
            return Contributions.empty()
        return from_outputs([job], [outcome])

    @abstractmethod
    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        """Prepares workers (ships the task, data and strategy once)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queues a job; it may start running at once."""

    @abstractmethod
    def result(self, job_id: int) -> Contributions:
        """Blocks until a submitted job is done and returns its one-row contributions (no
        row: its user code failed and on_client_error is 'drop')."""

    def discard(self, job_id: int) -> None:
        """Forgets a submitted job whose result will not be needed (default: fetch and drop)."""
        self.result(job_id)

    def poll(self, until: float) -> list[int]:
        """Waits until submitted jobs finish or the monotonic clock reaches `until`; returns
        the finished jobs' ids (their `result` no longer blocks). Needed by the wall clock only:
        executors that run jobs on demand (serial, vmap) do not implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot run on the wall clock")

    def keep_states(self, jobs: np.ndarray, clients: np.ndarray) -> None:
        """Learns that the client state these jobs produced is their clients' state from now on
        (the job was aggregated, or its client restarts from it); a deployment tells the nodes,
        which keep the states. Default: nothing to do (the protocol keeps states in its store)."""

    model_device: torch.device | None = None  # where the runner keeps the model (None: CPU)
    order_device: torch.device | None = None  # computes hashed batch orders of its cohorts there (None: the host does)
    order_graphs: bool = False  # computes them on static buffers per cohort shape (CUDA graphs on CUDA)

    def evaluate(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float | None]:
        """Evaluates `params` on (x, y) where this executor computes (default: in-process,
        `Task.evaluate`); returns Task.evaluate's metrics."""
        return task.evaluate(params, x, y, batch_size)

    def run(self, jobs: Sequence[Job]) -> Contributions:
        """Runs all jobs and returns their contributions, one row per job in the jobs' order
        (without the jobs whose user code failed, when on_client_error is 'drop')."""
        for job in jobs:
            self.submit(job)
        return Contributions.concat([self.result(job.job_id) for job in jobs])

    def close(self) -> None:
        """Stops workers and frees resources."""


def build_executor(config: "Config") -> Executor:
    """Builds `config.executor`. A factory whose first parameter is `ctx` is given the whole
    Config (the Ray executor reads the `ray` section and the plugins from it)."""
    params = list(inspect.signature(config.executor.entry.factory).parameters)
    return config.executor.build(config) if params[:1] == ["ctx"] else config.executor.build()
