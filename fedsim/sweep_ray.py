"""A sweep's runs as Ray tasks on a Ray cluster (`fedsim sweep --ray-address ADDR`).

Each run is one task asking for its CPUs (and GPUs), so Ray places as many runs on a node as
its resources allow; the task runs `fedsim.sweep.run_one` with torch threads = its CPUs. The
tasks import this checkout's fedsim (its folder first on their PYTHONPATH), read the config
file and write the run folders under the sweep folder: on a cluster of several machines the
config and the sweep folder must be on a file system every node sees.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import FedsimError
from .sweep import Outcome, StopRequest, SweepRun, run_one


def run_on_ray(source: str | Mapping[str, Any], runs: Sequence[SweepRun], out: Path, address: str,
               cpus_per_run: float, gpus_per_run: float, on_done: Callable[[Outcome], None]) -> tuple[list[Outcome], int | None]:
    """Runs every run as a Ray task on the cluster at `address` (attaching this process as a
    driver, or using the Ray it is already attached to); calls `on_done` as each ends. Returns
    the outcomes in plan order and the signal that stopped the sweep (None if none did): on
    SIGINT/SIGTERM the tasks are cancelled. FedsimError when Ray cannot be reached."""
    import ray

    from .config.ray_section import RaySection
    from .executors.ray_cluster import connect

    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise FedsimError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0 (got {cpus_per_run}, {gpus_per_run})")
    connection = connect(RaySection(address=address, code="path"))
    threads = max(1, math.floor(cpus_per_run))
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0,
                      runtime_env=connection.runtime_env or None)(run_one)
    outcomes: dict[str, Outcome] = {}
    stop = StopRequest(lambda: ())
    try:
        with stop:
            pending = {task.remote(source, r, out / r.name, threads): r for r in runs}
            cancelled = False
            while pending:
                if stop.signal is not None and not cancelled:
                    for ref in pending:  # a running run stops at once (its newest checkpoint is kept)
                        ray.cancel(ref, force=False)
                    cancelled = True
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                for ref in done:
                    run = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.TaskCancelledError:
                        outcome = Outcome(run, "interrupted", error="cancelled")
                    except (ray.exceptions.RayError, OSError) as exc:  # the task's worker or node died
                        outcome = Outcome(run, "failed", error=f"Ray task failed: {str(exc).splitlines()[0]}")
                    outcomes[run.name] = outcome
                    on_done(outcome)
    finally:
        connection.close()
    return [outcomes[r.name] for r in runs], stop.signal
