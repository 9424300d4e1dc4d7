"""The Ray executor with `worker: vmap`: each cohort split over the actors, one vmap call per shard.

The jobs waiting in the driver when a result is needed (a synchronous round's cohort; for
the event-driven protocols, every job submitted since the last wait, as the vmap executor
gathers them) are split into contiguous shards balanced by job count, one per started
actor. Each actor runs its shard with a vmap executor on its own device (the GPU Ray
assigned it, else the CPU) and answers with the shard's contributions as one stacked value
(one update tensor per shard, not one object per client); the driver puts the shards back
together in the jobs' order. A job's payload travels once per shard and model version, so
a synchronous round's model is broadcast inside each actor's vmap call.

Everything else is the Ray executor's (`RayExecutor`): the actor pool and its resources,
the training data shipped once, payloads put once per model version, a lost or silent
actor replaced and its shard run again from the same inputs (split over the actors started
by then), StepAbandoned when none is left, and stop requests between waits. A job's result
does not depend on which shard it ran in, up to float rounding (the vmap executor's
batched kernels).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..contributions import Contributions
from ..errors import ClientJobError, FedsimError
from .base import Job
from .ray_actor import CohortRunner, ShardResult, from_wire
from .ray_executor import RayExecutor, _Slot


class ShardedRayExecutor(RayExecutor):
    """See the module docstring. `vmap_options` are the vmap executor's keyword arguments
    (other than its device) for every actor."""

    runner_class = CohortRunner

    def __init__(self, *args: Any, vmap_options: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vmap_options = vmap_options
        self.shards = 0  # shards sent to actors (re-sent ones too)
        self.compute_s = 0.0  # seconds the actors spent in their shards' vmap calls, summed
        self.fetch_s = 0.0  # seconds the driver spent fetching and unpickling shard results
        # self._done: job id -> (its shard's contributions, its row there)

    def _runner_args(self) -> tuple[Any, ...]:
        return (self.vmap_options,)

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self._enqueue(job)  # sent when a result is needed, with the others then waiting

    def result(self, job_id: int) -> Contributions:
        self._await_jobs([job_id])
        piece, row = self._done.pop(job_id)
        return piece if len(piece) == 1 else piece.row(row)

    def run(self, jobs: Sequence[Job]) -> Contributions:
        """Runs `jobs` (with any still waiting) sharded over the actors; returns their
        contributions in the jobs' order, whole shards concatenated."""
        for job in jobs:
            self._enqueue(job)
        self._await_jobs([job.job_id for job in jobs])
        runs: list[list[Any]] = []  # [shard contributions, first row, end row]: consecutive rows of one shard
        for job in jobs:
            piece, row = self._done.pop(job.job_id)
            if runs and runs[-1][0] is piece and runs[-1][2] == row:
                runs[-1][2] += 1
            else:
                runs.append([piece, row, row + 1])
        return Contributions.concat([p if (a, b) == (0, len(p)) else p.take(np.arange(a, b)) for p, a, b in runs])

    def _await_jobs(self, job_ids: list[int]) -> None:
        """Sends the waiting jobs to the actors and waits until every job of `job_ids` is done."""
        for job_id in job_ids:
            if job_id not in self._pending and job_id not in self._done:
                raise KeyError(f"job {job_id} was not submitted (or its result was already taken)")
        self._dispatch()
        while any(job_id not in self._done for job_id in job_ids):
            self._await_answer()
            self._dispatch()

    def _dispatch(self) -> None:
        """Splits the waiting jobs into contiguous shards of balanced size, one per started
        actor (the least busy first), and sends each as one call."""
        live = sorted((s for s in self._slots if s.starting is None), key=lambda s: len(s.running))
        if not self._queue or not live:
            return
        ids = list(self._queue)
        self._queue.clear()
        bounds = [len(ids) * k // len(live) for k in range(len(live) + 1)]
        for slot, a, b in zip(live, bounds, bounds[1:]):
            if a < b:
                self._send(slot, ids[a:b])

    def _send(self, slot: _Slot, shard: list[int]) -> None:
        jobs, payload_of, keys = [], [], {}  # keys: payload key -> its position among the call's payloads
        for job_id in shard:
            pending = self._pending[job_id]
            jobs.append(pending.job)
            payload_of.append(keys.setdefault(pending.payload, len(keys)))
        refs = [self._payloads[key][1] for key in keys]  # top-level arguments: Ray resolves them in the actor
        ref = slot.handle.run.remote(jobs, payload_of, *refs)
        self._running[ref] = (shard, slot)  # type: ignore[assignment]
        if not slot.running:
            slot.since = time.monotonic()
        slot.running.update(shard)
        self.shards += 1

    def _collect(self, ref: Any) -> None:
        import ray
        from ray.exceptions import NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError, RayError, WorkerCrashedError

        shard, slot = self._running.pop(ref)
        try:
            began = time.perf_counter()
            answer: ShardResult = ray.get(ref)
            got = answer.contributions if isinstance(answer.contributions, tuple) else from_wire(answer.contributions)
            self.fetch_s += time.perf_counter() - began
        except (RayActorError, WorkerCrashedError, OutOfMemoryError, NodeDiedError, ObjectLostError) as exc:
            self._actor_lost(slot, exc)  # the shard is still among slot.running: queued again
            return
        except RayError as exc:
            clients = sorted({self._pending[j].job.client for j in shard})
            raise FedsimError(f"a shard of {len(shard)} jobs (clients {clients[:5]}{'…' if len(clients) > 5 else ''}): "
                              f"Ray could not run it: {exc}") from None
        slot.running.difference_update(shard)
        slot.since = time.monotonic()
        self.compute_s += answer.compute_s
        if isinstance(got, tuple):  # a client's code raised (on_client_error is 'stop' with this worker)
            raise ClientJobError(*got)
        if got.jobs.tolist() != shard:
            raise RuntimeError(f"a shard came back with jobs {got.jobs.tolist()[:5]}…, not the ones sent")
        for row, job_id in enumerate(shard):
            if not self._pending[job_id].discarded:
                self._done[job_id] = (got, row)  # type: ignore[assignment]
            self._release(job_id)
