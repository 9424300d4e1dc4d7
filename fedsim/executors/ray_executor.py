"""The Ray executor: client jobs on a pool of long-lived Ray actors, one machine or a cluster.

* **Shipped once.** The task, strategy and hyperparameters go to the object store once, and
  so do the training data (as numpy arrays: actors on a node share one zero-copy copy).
  Each model version a protocol publishes is put once and jobs carry its reference; a job
  itself is only sample indices, the client's state and a few ids.
* **Pull scheduling.** At most `jobs_per_actor` jobs wait on an actor; the rest queue in the
  driver and go to whichever actor frees up first, so faster actors (a GPU group) take more.
  The order in which results arrive does not matter: the protocol consumes them in
  virtual-time order and every random draw is keyed, so results equal the serial executor's.
* **Faults.** An actor that dies (killed process, out of memory, lost node) or holds a job
  past `job_timeout` is replaced by a new one of its group, and its jobs are re-run from the
  same inputs (so results do not change), up to `max_job_retries` times per job. Jobs go
  only to started actors, so the run goes on with the others while a replacement waits
  for room; when none is left and none starts within `actor_start_timeout`, the step gives
  up (StepAbandoned) and the runner stops with a checkpoint. Waits on Ray are short slices,
  so a stop signal ends them (fedsim.stopping). An exception in user code comes back with
  the client id and the original traceback, and stops the run or drops the client
  (`on_client_error`).
* **Memory.** The driver keeps object references only while a job needs them; actors keep
  nothing between jobs.
* **Sharded cohorts.** With `worker: vmap` (`ShardedRayExecutor`, fedsim.executors.ray_shards)
  each actor holds a vmap executor and each cohort goes out as one contiguous shard per
  actor; the rest above holds for shards instead of jobs.

Ray is imported inside the functions that use it: the registry imports this module for every
run, and only runs on Ray should pay for importing Ray.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Dict, List, Mapping, Optional

import torch

from .. import stopping
from ..config.checks import Ge, Gt, OneOf
from ..config.components import dataclass_knobs, signature_knobs, validate_knobs
from ..config.load import Config
from ..config.ray_section import RaySection
from ..config.schema import knob
from ..errors import ConfigError, FedsimError, StepAbandoned
from ..registry import EXECUTORS
from ..strategy import Payload, Strategy
from ..contributions import Contributions
from ..strategy import ClientOutput
from .base import Executor, Job, OnClientError, WorkerSpec
from .ray_actor import JobRunner
from .ray_cluster import Connection, connect, ship_by_value

READY_WARN_S = 60.0  # warn when actors take this long to start (a busy or too small cluster)
WAIT_SLICE_S = 0.5  # longest single wait on Ray: a stop request and the timeouts are checked between them


@dataclass
class ActorGroup:
    """One kind of actor in the pool (`executor.groups` entries have these keys)."""

    num_actors: Annotated[Optional[int], Ge(1)] = knob(
        None, "Actors of this kind (default: as many as the cluster's resources fit)."
    )
    num_cpus: Annotated[float, Gt(0)] = knob(
        1.0, "CPUs reserved per actor; also its torch threads (at least 1) unless run.torch_threads is set."
    )
    num_gpus: Annotated[float, Ge(0)] = knob(
        0.0, "GPU share per actor (0.25: four actors per GPU); > 0 trains on the GPU, with PyTorch's "
        "memory capped at this share."
    )
    resources: Dict[str, float] = knob({}, "Custom Ray resources per actor, e.g. {big_node: 1}.")

    def demand(self) -> dict[str, float]:
        """Returns the Ray resources one actor of this group needs."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: float(v) for k, v in need.items() if v > 0}


@dataclass(eq=False)
class _Slot:
    """An actor and the jobs it holds."""

    handle: Any
    group: ActorGroup
    starting: Any = None  # the ObjectRef of its `ready` call until it has answered (then None)
    since: float = field(default_factory=time.monotonic)  # created, started, or last answered a job
    running: set[int] = field(default_factory=set)
    warned: bool = False  # a warning said it is not placed yet


@dataclass
class _Pending:
    job: Job  # without its payload (that travels as a reference)
    payload: int  # key into the payload cache
    attempts: int = 0
    discarded: bool = False


class RayExecutor(Executor):
    """See the module docstring."""

    runner_class: type = JobRunner  # what each actor holds (fedsim.executors.ray_actor)

    def __init__(self, groups: list[ActorGroup], section: RaySection, code_modules: list[str], threads: int | None,
                 on_client_error: str, max_job_retries: int, jobs_per_actor: int, actor_start_timeout: float = 300.0,
                 job_timeout: float | None = None):
        self.groups = groups
        self.threads = threads
        self.section = section
        self.code_modules = code_modules  # user modules whose code runs in actors (shipped by value)
        self.on_client_error = on_client_error
        self.max_job_retries = max_job_retries
        self.jobs_per_actor = jobs_per_actor
        self.actor_start_timeout = actor_start_timeout
        self.job_timeout = job_timeout
        self.replacements = 0  # actors replaced after dying or falling silent
        self.models_put = 0  # payloads (model versions) put in the object store
        self.placement: list[dict[str, Any]] = []  # per actor started (replacements too): JobRunner.ready()
        self._conn: Connection | None = None
        self._slots: list[_Slot] = []
        self._queue: deque[int] = deque()
        self._pending: dict[int, _Pending] = {}
        self._running: dict[Any, tuple[int, _Slot]] = {}  # ObjectRef -> (job id, slot)
        self._done: dict[int, tuple[Job, ClientOutput | str]] = {}  # job id -> (job, output or its code's traceback)
        self._payloads: dict[int, list[Any]] = {}  # id(payload) -> [payload, ref, jobs using it]
        self._shared: tuple[Any, ...] = ()  # refs of the spec and the data

    # -- set-up ---------------------------------------------------------------------------
    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        self._conn = connect(self.section)
        try:
            self._start_actors(spec)
        except BaseException:
            self.close()  # a private local Ray must not outlive a failed start
            raise

    def _start_actors(self, spec: WorkerSpec) -> None:
        import ray

        ship_by_value(self.code_modules)
        bare = replace(spec, x_train=torch.empty(0), y_train=torch.empty(0))
        self._shared = (ray.put(bare), ray.put(_numpy(spec.x_train)), ray.put(_numpy(spec.y_train)))
        self._actor_class = ray.remote(self.runner_class)
        groups = [replace(g, num_actors=g.num_actors or _fitting(g)) for g in self.groups]
        _check_fits(groups)
        self._slots = [self._new_slot(g) for g in groups for _ in range(g.num_actors or 1)]
        self._await_pool()

    def _new_slot(self, group: ActorGroup) -> _Slot:
        """Creates an actor of `group`; it takes jobs once its `ready` call has answered."""
        assert self._conn is not None
        handle = self._actor_class.options(
            num_cpus=group.num_cpus, num_gpus=group.num_gpus, resources=dict(group.resources),
            runtime_env=self._conn.runtime_env, max_restarts=0, max_task_retries=0,
        ).remote(*self._shared, self.threads or max(1, int(group.num_cpus)), group.num_gpus, *self._runner_args())
        return _Slot(handle, group, starting=handle.ready.remote())

    def _runner_args(self) -> tuple[Any, ...]:
        """Arguments of an actor's runner after the shared ones, its threads and GPU share."""
        return ()

    def _await_pool(self) -> None:
        """Waits until every actor has started (warning after READY_WARN_S); raises FedsimError
        when one cannot start or some are not placed within `actor_start_timeout`."""
        import ray

        began, warned = time.monotonic(), False
        while starting := [s.starting for s in self._slots if s.starting is not None]:
            ready, _ = ray.wait(starting, num_returns=len(starting), timeout=WAIT_SLICE_S)
            for ref in ready:
                self._take(ref)
            left, waited = len(starting) - len(ready), time.monotonic() - began
            if left and waited > self.actor_start_timeout:
                raise StepAbandoned(f"{left} of {len(self._slots)} Ray actors were not placed within "
                                  f"executor.actor_start_timeout={self.actor_start_timeout:g} s; {self._room()}")
            if left and not warned and waited > READY_WARN_S:
                warned = True
                warnings.warn(f"{left} Ray actor(s) still starting after {READY_WARN_S:.0f} s "
                              "(is the cluster busy?)", RuntimeWarning, stacklevel=2)

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self._enqueue(job)
        self._dispatch()

    def _enqueue(self, job: Job) -> None:
        """Queues `job` in the driver, its payload put in the object store once per model version."""
        import ray

        key = id(job.payload)
        entry = self._payloads.get(key)
        if entry is None:  # a model version not yet in the store (the entry pins the object, so ids stay unique)
            entry = self._payloads[key] = [job.payload, ray.put(_compact(job.payload)), 0]
            self.models_put += 1
        entry[2] += 1
        self._pending[job.job_id] = _Pending(replace(job, payload=None), key)  # type: ignore[arg-type]
        self._queue.append(job.job_id)

    def result(self, job_id: int) -> Contributions:
        if job_id not in self._pending and job_id not in self._done:
            raise KeyError(f"job {job_id} was not submitted (or its result was already taken)")
        while job_id not in self._done:
            self._await_answer()
            self._dispatch()
        return self.contribution(*self._done.pop(job_id))

    def discard(self, job_id: int) -> None:
        if self._done.pop(job_id, None) is not None or job_id not in self._pending:
            return
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._release(job_id)
        else:  # running: its result is dropped when it arrives
            self._pending[job_id].discarded = True

    def _dispatch(self) -> None:
        """Hands queued jobs to the started actors holding the fewest (actors still starting,
        e.g. replacements that do not fit anywhere yet, take none)."""
        while self._queue:
            live = [s for s in self._slots if s.starting is None]
            slot = min(live, key=lambda s: len(s.running), default=None)
            if slot is None or len(slot.running) >= self.jobs_per_actor:
                return
            job_id = self._queue.popleft()
            pending = self._pending[job_id]
            ref = slot.handle.run.remote(pending.job, self._payloads[pending.payload][1])
            self._running[ref] = (job_id, slot)
            if not slot.running:
                slot.since = time.monotonic()
            slot.running.add(job_id)

    def _await_answer(self) -> None:
        """Waits for the next job result or started actor and takes it in. Waits in slices of
        WAIT_SLICE_S; between them, gives up when a stop was requested (fedsim.stopping) or
        when no actor has been able to start for `actor_start_timeout`, and replaces an actor
        that has held a job for longer than `job_timeout` without answering."""
        import ray

        while True:
            refs = [*self._running, *(s.starting for s in self._slots if s.starting is not None)]
            if not refs:
                raise RuntimeError("the Ray executor waits for a job that no actor holds or will take")
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_SLICE_S)
            if ready:
                self._take(ready[0])
                return
            stopping.check()
            self._check_timeouts()

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        live = [s for s in self._slots if s.starting is None]
        if not live and now - max(s.since for s in self._slots) > self.actor_start_timeout:  # since the last loss
            raise StepAbandoned(f"no Ray actor is left and none could be placed within "
                                f"executor.actor_start_timeout={self.actor_start_timeout:g} s; {self._room()}")
        for slot in self._slots:
            if slot.starting is not None and not slot.warned and live and now - slot.since > READY_WARN_S:
                slot.warned = True
                warnings.warn(f"a replacement Ray actor is not placed after {READY_WARN_S:.0f} s (a node was "
                              f"lost?); the run goes on with {len(live)} actor(s); {self._room()}",
                              RuntimeWarning, stacklevel=2)
        if self.job_timeout is not None:
            for slot in live:
                if slot.running and now - slot.since > self.job_timeout:
                    self._actor_lost(slot, TimeoutError(
                        f"no answer within executor.job_timeout={self.job_timeout:g} s"))

    def _room(self) -> str:
        """Says what the actors still starting need and what the cluster has free."""
        import ray

        needs = list({str(s.group.demand()): s.group.demand() for s in self._slots if s.starting is not None}.values())
        keys = {k for need in needs for k in need}
        try:
            free = ray.available_resources()
        except Exception:  # noqa: BLE001 - only for the message
            return f"an actor needs {' or '.join(map(str, needs))}"
        return (f"an actor needs {' or '.join(map(str, needs))}, the cluster has "
                f"{ {k: free.get(k, 0.0) for k in sorted(keys)} } free")

    def _take(self, ref: Any) -> None:
        """Takes in a finished job or a started actor."""
        import ray
        from ray.exceptions import RayError

        if ref in self._running:
            self._collect(ref)
            return
        slot = next(s for s in self._slots if s.starting is not None and s.starting == ref)
        try:
            self.placement.append(ray.get(ref))
        except RayError as exc:
            raise StepAbandoned(f"a Ray actor could not start: {_gist(exc)}") from None
        slot.starting, slot.since = None, time.monotonic()

    def _collect(self, ref: Any) -> None:
        import ray
        from ray.exceptions import NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError, RayError, WorkerCrashedError

        job_id, slot = self._running.pop(ref)
        slot.running.discard(job_id)
        slot.since = time.monotonic()
        try:
            result = ray.get(ref)
        except (RayActorError, WorkerCrashedError, OutOfMemoryError, NodeDiedError, ObjectLostError) as exc:
            self._actor_lost(slot, exc, job_id)
            return
        except RayError as exc:
            client = self._pending[job_id].job.client
            raise FedsimError(f"client {client} (job {job_id}): Ray could not run the job: {exc}") from None
        if not self._pending[job_id].discarded:
            self._done[job_id] = (self._pending[job_id].job, result)
        self._release(job_id)

    def _actor_lost(self, slot: _Slot, exc: BaseException, job_id: int | None = None) -> None:
        """Replaces a dead or silent actor and queues its jobs (and `job_id`) again, first in
        line; raises StepAbandoned when a job has lost its actor more than max_job_retries times."""
        import ray

        again = slot.running | ({job_id} if job_id is not None else set())
        self._running = {r: v for r, v in self._running.items() if v[1] is not slot}
        self._slots[[i for i, s in enumerate(self._slots) if s is slot][0]] = self._new_slot(slot.group)
        self.replacements += 1
        try:
            ray.kill(slot.handle)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        for jid in sorted(again, reverse=True):
            pending = self._pending[jid]
            if pending.discarded:  # nobody waits for its result
                self._release(jid)
                continue
            pending.attempts += 1
            if pending.attempts > self.max_job_retries:
                raise StepAbandoned(
                    f"client {pending.job.client} (job {jid}): its Ray actor was lost {pending.attempts} times "
                    f"(executor.max_job_retries={self.max_job_retries}); last error: {_gist(exc)}"
                )
            self._queue.appendleft(jid)

    def _release(self, job_id: int) -> None:
        pending = self._pending.pop(job_id)
        entry = self._payloads[pending.payload]
        entry[2] -= 1
        if entry[2] == 0:
            del self._payloads[pending.payload]

    # -- introspection and shutdown -------------------------------------------------------
    def memory(self) -> list[dict[str, int]]:
        """Returns each started actor's {'rss', 'uss'} in bytes."""
        import ray

        return ray.get([s.handle.memory.remote() for s in self._slots if s.starting is None])

    def close(self) -> None:
        if self._conn is None:
            return
        import ray

        if ray.is_initialized():
            for slot in self._slots:
                ray.kill(slot.handle)
        self._slots, self._running, self._payloads, self._shared = [], {}, {}, ()
        self._pending.clear()
        self._done.clear()
        self._queue.clear()
        self._conn.close()
        self._conn = None


def _gist(exc: BaseException) -> str:
    """Returns the line of a (possibly long) error message that says what went wrong: the
    last one naming an exception, else the first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    return named[-1] if named else lines[0] if lines else type(exc).__name__


def _compact(payload: Payload) -> Payload:
    """Returns `payload` with every tensor that views a larger storage copied out: pickling a
    view ships its whole storage (a decentralized round's payloads are rows of the node stack)."""

    def own(t: Any) -> Any:
        small = not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() <= t.numel() * t.element_size()
        return t if small else t.clone()

    return Payload(own(payload.params), {k: own(v) for k, v in payload.extras.items()})


def _numpy(t: torch.Tensor) -> Any:
    return t.detach().cpu().contiguous().numpy()


def _fitting(group: ActorGroup) -> int:
    """Returns how many actors of `group` the whole cluster's resources hold (at least 1)."""
    import ray

    total = ray.cluster_resources()
    return max(1, min(int(total.get(k, 0.0) / v + 1e-9) for k, v in group.demand().items()))


def _check_fits(groups: list[ActorGroup]) -> None:
    """Raises ConfigError when an actor fits on no node, or all actors exceed the cluster."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total: dict[str, float] = {}
    for i, g in enumerate(groups):
        need = g.demand()
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes):
            raise ConfigError("executor", f"no node of the Ray cluster can host an actor needing {need} "
                              f"(group {i}; nodes offer {[{k: n[k] for k in need if k in n} for n in nodes]})")
        for k, v in need.items():
            total[k] = total.get(k, 0.0) + v * (g.num_actors or 1)
    have = ray.cluster_resources()
    short = {k: v for k, v in total.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        raise ConfigError("executor", f"the actors need {short} in all but the Ray cluster has "
                          f"{ {k: have.get(k, 0.0) for k in short} }; lower num_actors or the per-actor resources")


@EXECUTORS.register("ray")
def ray_executor(
    ctx: Config,
    num_actors: Annotated[Optional[int], Ge(1)] = None,
    num_cpus: Annotated[float, Gt(0)] = 1.0,
    num_gpus: Annotated[float, Ge(0)] = 0.0,
    resources: Optional[Dict[str, float]] = None,
    groups: Optional[List[Dict[str, Any]]] = None,
    on_client_error: OnClientError = "stop",
    max_job_retries: Annotated[int, Ge(0)] = 3,
    jobs_per_actor: Annotated[int, Ge(1)] = 2,
    actor_start_timeout: Annotated[float, Gt(0)] = 300.0,
    job_timeout: Annotated[Optional[float], Gt(0)] = None,
    worker: Annotated[str, OneOf(("serial", "vmap"))] = "serial",
    vmap: Optional[Dict[str, Any]] = None,
) -> Executor:
    """Runs client jobs on a pool of Ray actors (see docs/ray.md); the cluster is the `ray` section.

    Args:
        num_actors: Actors in the pool (default: as many as the cluster's CPUs/GPUs fit).
        num_cpus: CPUs reserved per actor; also its torch threads (at least 1) unless
            run.torch_threads is set (which then applies to the driver and every actor).
        num_gpus: GPU share per actor (0.25: four actors share a GPU); > 0 trains on the GPU,
            with PyTorch's memory on it capped at this share.
        resources: Custom Ray resources each actor needs, e.g. {big_node: 1}.
        groups: Heterogeneous pool instead of the four keys above: a list of
            {num_actors, num_cpus, num_gpus, resources}, one entry per kind of actor; any job
            runs on any actor, so faster kinds simply take more jobs.
        on_client_error: When a client's training code raises: 'stop' ends the run with the
            client id and the original traceback; 'drop' treats that client as dropped out.
        max_job_retries: Times a job is re-run after its actor died (killed, out of memory,
            node lost) or did not answer within job_timeout, before the run stops.
        jobs_per_actor: Jobs queued on one actor at a time (2 overlaps transfer and compute);
            the rest wait in the driver for the first free actor. Not used by worker: vmap
            (one shard per actor and cohort).
        actor_start_timeout: Seconds the actors may take to be placed and started: at the
            start, all of them; after losing actors (e.g. a node), at least one of them. Past
            it the run stops, with a checkpoint where the protocol allows (docs/ray.md).
        job_timeout: Seconds an actor may hold a job without answering before it counts as
            lost (null: no limit; a job may take as long as it takes). With worker: vmap, a
            whole shard.
        worker: How an actor runs jobs: 'serial' (one job at a time, any number of jobs in
            flight) or 'vmap' (each cohort is split into one contiguous shard per actor, run
            as one vmap call on the actor's device — its GPU when num_gpus > 0 — and sent
            back stacked; for cohorts of thousands of clients over several GPUs, docs/ray.md).
            'vmap' stops at a client's error (on_client_error: stop).
        vmap: Settings of the vmap executor in each actor with worker: vmap: the keys of
            executor.kind: vmap except device (the actor's) and keep_on_device, e.g.
            {precision: tf32, max_chunk: 4096}.
    """
    if groups:
        chosen = []
        for i, g in enumerate(groups):
            if not isinstance(g, Mapping):
                raise ConfigError(f"groups.{i}", f"expected a mapping of actor-group keys, got {g!r}")
            chosen.append(ActorGroup(**validate_knobs(f"groups.{i}", g, dataclass_knobs(ActorGroup), "actor group")))
            if len(groups) > 1 and chosen[-1].num_actors is None:
                raise ConfigError(f"groups.{i}.num_actors", "required when there are several actor groups")
    else:
        chosen = [ActorGroup(num_actors, num_cpus, num_gpus, dict(resources or {}))]
    section = RaySection(**ctx.extra.get("ray", {}))
    # user code that runs in actors: plugins, and a strategy or model given as 'module:factory'
    dotted = [c.name.partition(":")[0] for c in (ctx.strategy, ctx.model) if ":" in c.name]
    args = (chosen, section, [*ctx.plugins, *dotted], ctx.run.torch_threads, on_client_error,
            max_job_retries, jobs_per_actor, actor_start_timeout, job_timeout)
    if worker == "serial":
        if vmap:
            raise ConfigError("vmap", "settings of the vmap worker, but worker is 'serial'; set worker: vmap")
        return RayExecutor(*args)
    if on_client_error != "stop":
        raise ConfigError("on_client_error", "worker: vmap supports only 'stop'; use worker: serial to drop clients")
    from .ray_shards import ShardedRayExecutor
    from .vmap import vmap as vmap_factory

    knobs = [k for k in signature_knobs(vmap_factory) if k.name not in ("device", "keep_on_device")]
    return ShardedRayExecutor(*args, vmap_options=validate_knobs("vmap", vmap or {}, knobs, "the vmap worker"))
