"""The inside of one Ray actor, on its own device, fed by the Ray executor: a `JobRunner`
runs one job at a time with a `Worker`; a `CohortRunner` runs a shard of a cohort (many jobs)
with a vmap executor and answers with their stacked `Contributions`.

Plain Python (no Ray import), so it can be tested and run without Ray; the executor wraps it
with ``ray.remote`` and the actor's resources. The training data arrive once, as numpy arrays
from the object store (zero-copy on the actor's node), and stay for the actor's lifetime; a
job brings only its sample indices, the client's state and a model version from the store.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..contributions import Contributions
from ..errors import ClientJobError
from ..strategy import ClientOutput, Payload
from .base import Job, Worker, WorkerSpec


def to_device(value: Any, device: torch.device) -> Any:
    """Returns `value` with every tensor in it (payloads, dicts, outputs) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Payload):
        return Payload(to_device(value.params, device), to_device(dict(value.extras), device))
    if isinstance(value, ClientOutput):
        return ClientOutput(*(to_device(v, device) for v in value))
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    # arrays from the object store are read-only shared memory; jobs only index them (copies)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def actor_device(threads: int, gpu_fraction: float) -> torch.device:
    """Sets this actor process's torch threads and returns its device: the GPU Ray assigned
    (with PyTorch's memory on it capped at `gpu_fraction`, so a fraction is a limit rather than
    a hint) when `gpu_fraction` > 0, else the CPU."""
    torch.set_num_threads(threads)
    if gpu_fraction <= 0:
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_fraction), device)
    return device


class ActorBase:
    """What every kind of actor answers: where it runs, and its memory."""

    device: torch.device

    def ready(self) -> dict[str, Any]:
        """Returns where this actor runs: Ray node id (when inside Ray), pid, device, and the
        folder its fedsim package was imported from."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        package = str(Path(__file__).resolve().parents[1])
        return {"node": node, "pid": os.getpid(), "device": str(self.device), "fedsim": package}

    def memory(self) -> dict[str, int]:
        """Returns this process's resident set size and unique set size (bytes)."""
        import psutil

        info = psutil.Process().memory_full_info()
        return {"rss": int(info.rss), "uss": int(info.uss)}


class JobRunner(ActorBase):
    """Holds one Worker: the task, the shared training data and the built strategy.

    Args:
        spec: The WorkerSpec without its data (x_train and y_train are replaced by empty tensors).
        x_train, y_train: The shared training set as numpy arrays (one copy per node).
        threads: torch intra-op threads (the actor's CPU share).
        gpu_fraction: > 0: train on the GPU Ray assigned and cap this process's PyTorch
            memory at this fraction of it, so a fraction is a limit rather than a hint.
    """

    def __init__(self, spec: WorkerSpec, x_train: np.ndarray, y_train: np.ndarray, threads: int, gpu_fraction: float):
        self.device = actor_device(threads, gpu_fraction)
        spec.task.module.to(self.device)
        spec = replace(
            spec, x_train=_readonly_tensor(x_train).to(self.device), y_train=_readonly_tensor(y_train).to(self.device)
        )
        self.worker = Worker(spec)

    def run(self, job: Job, payload: Payload) -> ClientOutput | str:
        """Runs `job` from `payload` (sent apart, as a shared object-store reference) and returns
        its output on the CPU; an error in user code comes back as its traceback (a str)."""
        job = replace(job, payload=to_device(payload, self.device), state=to_device(job.state, self.device))
        out = self.worker.attempt(job)
        return out if isinstance(out, str) else to_device(out, torch.device("cpu"))


def _array(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        try:
            return value.detach().cpu().numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16): pickled as a tensor
            return value
    return value


def _tensor(value: Any) -> Any:
    # a copy: the array is read-only object-store memory, pinned while anything views it
    return torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value


def to_wire(c: Contributions) -> Contributions:
    """Returns `c` with its tensor columns as numpy arrays, which Ray stores and reads without
    pickling (5-6x faster than tensors for a shard's stacked updates); `from_wire` undoes it."""
    return c.replace(updates=_array(c.updates), extras={k: _array(v) for k, v in c.extras.items()},
                     state={k: _array(v) for k, v in c.state.items()})


def from_wire(c: Contributions) -> Contributions:
    """Returns `c` (as `to_wire` sent it) with tensor columns again, and every column copied
    out of the object store (arrays Ray returns are read-only views that pin the whole shard)."""
    own = {f: getattr(c, f).copy() for f in ("senders", "num_samples", "num_steps", "jobs", "versions")}
    return c.replace(updates=_tensor(c.updates), extras={k: _tensor(v) for k, v in c.extras.items()},
                     state={k: _tensor(v) for k, v in c.state.items()},
                     metrics={k: v.copy() for k, v in c.metrics.items()}, **own)


class ShardResult(NamedTuple):
    """A `CohortRunner`'s answer: the shard's contributions (on the CPU, in the jobs' order),
    or (client, job id, traceback) of the first job whose user code raised; and the seconds
    the actor computed (the vmap call, the copy of the results to the CPU included)."""

    contributions: Contributions | tuple[int, int, str]  # tensor columns as numpy arrays (to_wire)
    compute_s: float


class CohortRunner(ActorBase):
    """Holds a vmap executor on the actor's device (the GPU Ray assigned, else the CPU).

    Args:
        spec, x_train, y_train, threads, gpu_fraction: As for `JobRunner`.
        options: Keyword arguments of the vmap executor (fedsim.executors.vmap.vmap) other
            than its device, e.g. {'precision': 'tf32', 'max_chunk': 4096}.
    """

    def __init__(self, spec: WorkerSpec, x_train: np.ndarray, y_train: np.ndarray, threads: int, gpu_fraction: float,
                 options: dict[str, Any]):
        from .vmap import vmap

        self.device = actor_device(threads, gpu_fraction)
        self.executor = vmap(device=self.device.type, **options)
        self.executor.start(replace(spec, x_train=_readonly_tensor(x_train), y_train=_readonly_tensor(y_train)))

    def run(self, jobs: list[Job], payload_of: list[int], *payloads: Payload) -> ShardResult:
        """Runs the shard `jobs` (without payloads; job i starts from ``payloads[payload_of[i]]``,
        so jobs of one model version share one object and vmap broadcasts it) and returns their
        contributions on the CPU, as one stacked value (`to_wire`)."""
        began = time.perf_counter()
        try:
            out: Contributions | tuple[int, int, str] = to_wire(self.executor.run(
                [replace(job, payload=payloads[k]) for job, k in zip(jobs, payload_of)]))
        except ClientJobError as err:
            out = (err.client, err.job_id, err.detail)
        return ShardResult(out, time.perf_counter() - began)
