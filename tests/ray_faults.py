"""Strategies for the executor tests: FedAvg whose client code fails on purpose.

* `fedavg_dies_once`: inside a Ray actor, the process kills itself (SIGKILL) during its
  second job, once per marker file — an actor dying mid-run. Elsewhere it is plain FedAvg.
* `fedavg_loses_its_node`: inside a Ray actor, kills the raylet of its node (the actor's
  parent process) during a chosen job, once per marker file — a node lost mid-run.
* `fedavg_stalls`: inside a Ray actor, sleeps during a chosen job, once per marker file — a
  run blocked on Ray.
* `fedavg_raises`: raises ValueError in clients whose job has an odd number of local steps.

Named as `strategy: tests.ray_faults:fedavg_raises` (a `module:factory` name), so nothing is
registered globally and the Ray executor ships this module to its actors by value.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fedsim.strategy import Strategy
from fedsim.strategies.fedavg import fedavg


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _holds(resource: str | None) -> bool:
    import ray

    return resource is None or resource in ray.get_runtime_context().get_assigned_resources()


def _once_in_ray_actor(marker: str, job: int, act, resource: str | None = None):
    """FedAvg whose Ray actor (one holding `resource`, if given) calls `act()` during its
    `job`-th job, the first time the marker file is created."""
    base = fedavg()
    calls = [0]

    def local(payload, state, batches, grad_fn, hp):
        calls[0] += 1
        if calls[0] == job and _in_ray_actor() and _holds(resource) and not Path(marker).exists():
            Path(marker).touch()
            act()
        return base.local(payload, state, batches, grad_fn, hp)

    return base._replace(local=local)


def fedavg_dies_once(marker: str) -> Strategy:
    """FedAvg whose Ray actor process dies (SIGKILL) during its second job, once.

    Args:
        marker: File created just before the kill; while it exists nothing dies.
    """
    return _once_in_ray_actor(marker, 2, lambda: os.kill(os.getpid(), signal.SIGKILL))


def fedavg_loses_its_node(marker: str, resource: str, job: int = 2) -> Strategy:
    """FedAvg whose Ray actor on the node offering `resource` kills that node's raylet
    (SIGKILL) during its `job`-th job, once; the job then never answers (the actor ends with
    its node).

    Args:
        marker: File created just before the kill; while it exists nothing is killed.
        resource: A custom resource that only the doomed node offers (never kill the head).
        job: Which of the actor's jobs does it.
    """
    def lose_node():
        os.kill(os.getppid(), signal.SIGKILL)  # a Ray worker's parent is its node's raylet
        time.sleep(3600)

    return _once_in_ray_actor(marker, job, lose_node, resource)


def fedavg_stalls(marker: str, seconds: float, job: int = 2) -> Strategy:
    """FedAvg whose Ray actor sleeps `seconds` during its `job`-th job, once.

    Args:
        marker: File created when the sleep begins; while it exists nothing sleeps.
        seconds: How long the job sleeps.
        job: Which of the actor's jobs sleeps.
    """
    return _once_in_ray_actor(marker, job, lambda: time.sleep(seconds))


def fedavg_raises() -> Strategy:
    """FedAvg whose clients with an odd number of local steps raise ValueError."""
    base = fedavg()

    def local(payload, state, batches, grad_fn, hp):
        if batches.num_steps % 2 == 1:
            raise ValueError(f"boom: {batches.num_steps} steps")
        return base.local(payload, state, batches, grad_fn, hp)

    return base._replace(local=local)
