"""Strategies for the executor tests: FedAvg whose client code fails on purpose.

* `fedavg_dies_once`: inside a Ray actor, the process kills itself (SIGKILL) during its
  second job, once per marker file — an actor dying mid-run. Elsewhere it is plain FedAvg.
* `fedavg_raises`: raises ValueError in clients whose job has an odd number of local steps.

Named as `strategy: tests.ray_faults:fedavg_raises` (a `module:factory` name), so nothing is
registered globally and the Ray executor ships this module to its actors by value.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from fedsim.strategy import Strategy
from strategies.fedavg import fedavg


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def fedavg_dies_once(marker: str) -> Strategy:
    """FedAvg whose Ray actor process dies during its second job, once.

    Args:
        marker: File created just before the kill; while it exists nothing dies.
    """
    base = fedavg()
    calls = [0]

    def local(payload, state, batches, grad_fn, hp):
        calls[0] += 1
        if calls[0] == 2 and _in_ray_actor() and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return base.local(payload, state, batches, grad_fn, hp)

    return base._replace(local=local)


def fedavg_raises() -> Strategy:
    """FedAvg whose clients with an odd number of local steps raise ValueError."""
    base = fedavg()

    def local(payload, state, batches, grad_fn, hp):
        if batches.num_steps % 2 == 1:
            raise ValueError(f"boom: {batches.num_steps} steps")
        return base.local(payload, state, batches, grad_fn, hp)

    return base._replace(local=local)
