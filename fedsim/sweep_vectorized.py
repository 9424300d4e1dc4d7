"""Vectorised sweeps: the runs of a sweep that can share calls run as one vmap call per round.

Each run of a group is built and driven exactly as a single run (its own data, protocol,
client state, events, checkpoints, run folder), in a thread of its own, with a
`MemberExecutor` as its executor. The members hand their jobs to one `SharedVmap`, which
waits until every live run has handed in its next batch (a run that ends drops out), then
runs all of them as one cohort of the vmap executor (each run's global model goes in once
and is broadcast to its own clients, as in a single run's call: `cohort.block_size`) and
hands each run back its own rows.

Only one run's Python code runs at a time (a baton: the lock of the shared condition), and
each run keeps its own torch generator states across the hand-overs, so what a run draws is
what it would draw alone. The shared calls and the runs' evaluations run in the thread that
called `run_together` (the main thread), not in the runs' own: glibc gives threads started
after torch's worker threads a separate heap of 64 MB segments in turn, and a cohort's large
blocks there were mapped and unmapped call after call (a CNN's shared call took 1.5x as long
in such a thread). The runs' training sets are put side by side on the device once
(a set equal to an earlier run's is shared); each job's sample indices are shifted to its
run's block. A vectorised call computes every client's update exactly as the run's own
executor would, up to float rounding (different batch shapes pick different kernels).

Every built-in protocol fits: a synchronous round hands in its cohort, an asynchronous run
the jobs it dispatched until it needs a result, a decentralized round every node's step.
Runs may differ in more than the seed (`why_not`): in the local learning rate, momentum and
weight decay, which each job then carries as its own (`fedsim.strategy.split_job_hp`), and in
the strategy, protocol, topology, system, run and data settings, as long as their clients' local update
is the same code (`fedsim.closures`): the same function (a different server learning rate),
or one template whose captured floats each job carries (a different FedProx μ); everything
else — model, executor, the rest of `local` — must be equal. `groups` splits a sweep's runs
into groups that can share calls. When the built runs' models or data turn out to differ in
shape, their local updates differ in code, or the values that travel with the jobs cannot be
batched (the first shared call fails), the runs run separately and one line says why.
"""
from __future__ import annotations

import copy
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from .contributions import Contributions
from .errors import Interrupted, StepAbandoned, first_line
from .executors.base import Executor, Job, WorkerSpec, build_executor
from .executors.job_batch import JobBatch
from .executors.precision import keep_freed_memory, precision
from .executors.vmap import NotVectorisable, VmapExecutor, resolve_device
from .rng import initialised_cuda, key, set_torch_states, torch_states
from .closures import Lifted
from .strategy import CAPTURED_PREFIX, JOB_HP_FIELDS, JOB_HP_PREFIX, Payload, Strategy, Tensor
from .task import Task

VECTORISED_PROTOCOLS = ("sync", "async", "decentralized", "async_gossip")  # the built-in ones
WAIT_S = 0.5  # a run waiting for the server looks again after this long
T = TypeVar("T")


FREE_KEYS = ("seed", "name", "local.lr", "local.momentum", "local.weight_decay")  # may differ between runs
FREE_SECTIONS = ("strategy", "protocol", "topology", "system", "run", "data")  # if the local updates are the same
BOUND_KEYS = ("run.torch_threads",)  # one process: must be equal
FREE_TEXT = ("the seed, local.lr, local.momentum, local.weight_decay and the strategy, protocol, topology, system, "
             "run and data settings")


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Returns the dotted keys whose values differ between two resolved config mappings."""
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _free(key: str) -> bool:
    return key not in BOUND_KEYS and (key in FREE_KEYS or key.split(".")[0] in FREE_SECTIONS)


def why_not(configs: Sequence[Any]) -> str | None:
    """Returns why the runs of `configs` (fedsim Configs) cannot share vmap calls, or None
    when they can: at least two runs, the vmap executor, built-in protocols (a plugin
    protocol may use the executor in ways a shared one does not follow), configs that differ
    only where runs may (`FREE_KEYS`, `FREE_SECTIONS`), and, where their strategy settings
    differ, local updates that are the same function (built here without a StrategyContext;
    the shared executor checks the runs' own strategies again once they are built)."""
    if len(configs) < 2:
        return "a single run"
    first = configs[0]
    if first.executor.name != "vmap":
        return f"executor.kind is {first.executor.name!r}, not 'vmap'"
    for cfg in configs:
        if cfg.protocol.name not in VECTORISED_PROTOCOLS:
            return f"protocol {cfg.protocol.name!r}: only the built-in protocols are vectorised"
    base = first.resolved()
    strategy_differs = False
    for cfg in configs[1:]:
        keys = differing_keys(base, cfg.resolved())
        bound = [k for k in keys if not _free(k)]
        if bound:
            return f"the runs differ in {bound[0]} (runs that share calls may differ only in {FREE_TEXT})"
        strategy_differs = strategy_differs or any(k.startswith("strategy.") for k in keys)
    if strategy_differs:
        return shared_local([_built_strategy(cfg) for cfg in configs])[1]
    return None


def _built_strategy(cfg: Any) -> Strategy | None:
    from .wrappers import build_strategy

    try:
        return build_strategy(cfg.strategy, None)
    except Exception:  # noqa: BLE001 - a factory that needs its run's context: cannot tell here
        return None


def shared_local(strategies: Sequence[Strategy | None]) -> "tuple[Lifted | None, str | None]":
    """Returns (the template of the strategies' client updates when they differ only in floats
    they capture, else None; why they cannot share a call, None when they can). Updates that
    are the same function share as they are; updates that differ in captured floats (FedProx's
    μ, SAM's ρ) share through the template, each job carrying its run's values."""
    from .closures import lift, same_function

    first = strategies[0]
    if first is None or any(s is None for s in strategies):
        return None, "their strategies could not be built to compare their local updates"
    if any((s.client_state is None) != (first.client_state is None) for s in strategies):
        return None, "their strategies' local updates differ (one keeps client state, one does not)"
    if all(same_function(first.local, s.local) for s in strategies[1:]):
        return None, None
    lifted = lift([s.local for s in strategies])
    if lifted is None:
        return None, "their strategies' local updates differ in more than the numbers they capture"
    return lifted, None


def with_lifted_local(strategy: Strategy, lifted: "Lifted") -> Strategy:
    """Returns `strategy` whose ``local`` runs `lifted`'s template with the captured values
    each job carries as extras ``hp.captured.0``, ``hp.captured.1``, … (one per client under vmap)."""
    names = [f"{CAPTURED_PREFIX}{i}" for i in range(len(lifted.names))]

    def local(payload: Payload, state, batches, grad_fn, hp):
        extras = {k: v for k, v in payload.extras.items() if not k.startswith(CAPTURED_PREFIX)}
        own = lifted.build([payload.extras[k] for k in names])
        return own(Payload(payload.params, extras), state, batches, grad_fn, hp)

    local.__dict__.update(strategy.local.__dict__)  # markers such as carries_running_stats
    return strategy._replace(local=local)


def groups(configs: Sequence[Any]) -> tuple[list[list[int]], dict[int, str]]:
    """Splits runs (their Configs) into groups that can share vmap calls: each run joins the
    first group it can share with (`why_not`). Returns the groups of two or more runs (indices
    into `configs`, in order) and, for each run left alone, why it could not join the first group."""
    formed: list[list[int]] = []
    for i, cfg in enumerate(configs):
        # what may differ is compared with the group's first run: a run that differs from it only
        # where runs may differ differs from every other member only there too
        g = next((g for g in formed if why_not([configs[g[0]], cfg]) is None), None)
        if g is None:
            formed.append([i])
        else:
            g.append(i)
    alone: dict[int, str] = {}
    for g in formed:
        if len(g) == 1:
            other = 1 if g[0] == 0 else 0
            reason = why_not([configs[g[0]]] if len(configs) == 1 else [configs[other], configs[g[0]]])
            alone[g[0]] = reason or "no other run left to share with"
    return [g for g in formed if len(g) > 1], alone


def shape_mismatch(specs: Sequence[WorkerSpec]) -> str | None:
    """Returns how the built runs' models or data differ in shape (None: they fit one call)."""
    first = specs[0]
    for spec in specs[1:]:
        if spec.task.layout.dim != first.task.layout.dim:
            return f"their models differ in size ({first.task.layout.dim} vs {spec.task.layout.dim} parameters)"
        for what, a, b in (("inputs", first.x_train, spec.x_train), ("targets", first.y_train, spec.y_train)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                return (f"their training {what} differ in shape ({tuple(a.shape[1:])} {a.dtype} vs "
                        f"{tuple(b.shape[1:])} {b.dtype})")
        if spec.augment != first.augment and (spec.augment.active or first.augment.active):
            return "their data augmentation differs"
    if first.augment.active:
        return "data augmentation draws are keyed by each run's seed"
    return None


class SharedVmap:
    """The barrier and the one vmap executor that the `MemberExecutor`s of a group share."""

    def __init__(self, configs: Sequence[Any], print_line: Callable[[str], Any] = print):
        self.configs = list(configs)
        self.print_line = print_line
        self.baton = threading.RLock()  # held by the one thread that runs: a run, or the server
        self.cond = threading.Condition(self.baton)  # the runs wait here for their results
        self.work = threading.Event()  # set when the server has work (it waits off the baton, for signals)
        self.serving = False  # a thread runs `serve`: shared calls and evaluations go to it
        self.ready = False  # every live run handed in its batch: the shared call is due
        self.calls: list[tuple[int, Callable[[], Any]]] = []  # other work for the server, in order
        self.answers: dict[int, tuple[bool, Any]] = {}  # ticket -> (raised, result)
        self.tickets = 0
        self.live = set(range(len(configs)))
        self.specs: dict[int, tuple[WorkerSpec, Strategy | None]] = {}
        self.batch: dict[int, Sequence[Job]] = {}
        self.results: dict[int, Contributions | BaseException] = {}
        self.vmap: VmapExecutor = build_executor(self.configs[0])
        if self.vmap.keep_memory and resolve_device(self.vmap.device_name).type == "cpu":
            keep_freed_memory()  # before the runs' threads start: they share the main heap (1.65x on a CNN)
        self.solo: dict[int, Executor] | None = None  # set when the runs cannot share calls: each its own
        self.offsets: dict[int, int] | None = None  # each run's first row in the shared training set
        self.stop_signal: int | None = None
        self.next_id = 0
        self.job_hp: dict[int, dict[str, float]] = {}  # each run's local settings where the runs' differ
        self.own_values: list[str] = []  # what differs between the runs and travels with each job
        self.shared_proven = False  # a shared call has succeeded
        self._hp_tensors: dict[tuple, dict[str, Tensor]] = {}

    # ---- the barrier ------------------------------------------------------------------------
    def exchange(self, member: int, jobs: Sequence[Job]) -> Contributions:
        """Hands in `member`'s next batch and returns its contributions (in the jobs' order)
        once the batch of every live run has run. Call while holding the baton."""
        with self.cond:
            if self.stop_signal is not None:
                raise StepAbandoned("the sweep was asked to stop", self.stop_signal)
            if self.solo is not None:
                return self._on_server(lambda: self.solo[member].run(jobs))
            self.batch[member] = jobs
            self._batch_complete()
            while member not in self.results:
                self._wait()
                if not self.serving and self.batch and self.batch.keys() >= self.live:
                    self.ready = False  # the server stopped before running it: run it here
                    self._execute()
            out = self.results.pop(member)
            if isinstance(out, BaseException):
                raise out
            return out

    def leave(self, member: int) -> None:
        """`member` submits no more jobs (it finished or failed): the others stop waiting for it."""
        with self.cond:
            if member not in self.live:
                return
            self.live.discard(member)
            self._batch_complete()
            self.cond.notify_all()
            self.work.set()

    def serve(self, start: Callable[[], Any]) -> None:
        """Calls `start()` (which starts the runs' threads), then runs the shared calls and the
        work the runs hand over (`_on_server`) in the calling thread until every run has left,
        with the runs' `run.torch_threads` (torch's thread count is set per thread).
        Between two pieces of work it waits off the baton, in waits that let signal handlers run
        every 0.2 s even while a run holds the baton. A second Ctrl-C (Interrupted) ends it at
        once; the runs of the call it interrupted stop as at their next batch."""
        threads, before = self.configs[0].run.torch_threads, torch.get_num_threads()
        self.baton.acquire()  # the runs' threads wait for it until this thread waits for work
        try:
            if threads:  # the runs' own setting (equal in a group): set in their threads, it stays there
                torch.set_num_threads(threads)
            self.serving = True
            start()
            while self.live or self.ready or self.calls:
                if self.ready:
                    self.ready = False
                    self._execute()
                elif self.calls:
                    self._answer(*self.calls.pop(0))
                else:
                    self.work.clear()  # holding the baton: a run sets it only after this
                    self.baton.release()
                    try:
                        self.work.wait(0.2)
                    finally:
                        while not self.baton.acquire(timeout=0.2):
                            pass
        finally:
            self.serving = False
            if threads:
                torch.set_num_threads(before)
            if self.baton._is_owned():  # not when a handler raised while this thread waited for it
                self.cond.notify_all()
                self.baton.release()

    def _answer(self, ticket: int, fn: Callable[[], Any]) -> None:
        """Runs a call a run handed over and hands back its result or exception."""
        try:
            self.answers[ticket] = (False, fn())
        except (Interrupted, KeyboardInterrupt):  # a second Ctrl-C: the run stops, this thread too
            self.answers[ticket] = (True, self._abandoned())
            raise
        except BaseException as exc:  # noqa: BLE001 - raised in the run's thread
            self.answers[ticket] = (True, exc)
        finally:
            self.cond.notify_all()

    def _abandoned(self) -> StepAbandoned:
        """What a run gets for work that a second Ctrl-C interrupted: it stops as at its next batch."""
        return StepAbandoned("the sweep was asked to stop", self.stop_signal or signal.SIGINT)

    def _batch_complete(self) -> None:
        """If every live run has handed in its batch, has the shared call run: by the server,
        or here when no thread serves."""
        if not self.batch or not self.batch.keys() >= self.live:
            return
        if self.serving:
            self.ready = True
            self.work.set()
        else:
            self._execute()

    def _on_server(self, fn: Callable[[], T]) -> T:
        """Returns fn() run by the serving thread (here when no thread serves), drawing from
        this run's torch generator states and leaving them as fn left them, as if it ran here.
        Call holding the baton."""
        if not self.serving:
            return fn()
        mine = torch_states(initialised_cuda())

        def call() -> tuple[T, list[Tensor]]:
            set_torch_states(mine, initialised_cuda())
            return fn(), torch_states(initialised_cuda())

        ticket = self.tickets = self.tickets + 1
        self.calls.append((ticket, call))
        self.work.set()
        while ticket not in self.answers:
            self.cond.wait(WAIT_S)
            if not self.serving and ticket not in self.answers:  # the server stopped first
                self.calls = [c for c in self.calls if c[0] != ticket]
                set_torch_states(mine, initialised_cuda())
                return fn()
        raised, out = self.answers.pop(ticket)
        if raised:
            raise out
        result, states = out
        set_torch_states(states, initialised_cuda())
        return result

    def _wait(self) -> None:
        """Waits for the server (or another run) to notify, at most `WAIT_S` (a server stopped by
        a signal may not notify), keeping this run's torch generators."""
        cuda = initialised_cuda()
        states = torch_states(cuda)  # another run draws from the global generators meanwhile
        self.cond.wait(WAIT_S)
        set_torch_states(states, cuda)

    def interrupt(self, signum: int) -> None:
        """Asks every run to stop at its next batch (it writes a checkpoint and ends); the
        batch under way still completes, as the last run to hand in its batch leaves instead."""
        self.stop_signal = signum

    def close(self) -> None:
        """Frees the shared executor (and the runs' own ones)."""
        for executor in [self.vmap, *(self.solo or {}).values()]:
            executor.close()

    # ---- running a batch -------------------------------------------------------------------
    def _execute(self) -> None:
        batch, self.batch = self.batch, {}
        try:
            if self.offsets is None:
                self._start()
            if self.solo is not None:
                for member, jobs in batch.items():
                    self.results[member] = self.solo[member].run(jobs)
            else:
                try:
                    self._run_shared(batch)
                    self.shared_proven = True
                except Exception as exc:  # noqa: BLE001 - decided below
                    unvectorised = isinstance(exc, NotVectorisable)
                    if not unvectorised and (not self.own_values or self.shared_proven):
                        raise
                    # a local update vmap cannot batch (a compressor drawing from each job's key;
                    # Python control flow on the runs' own momentum, μ…) would run client by client
                    # under the shared call's job ids and the first run's seed: every run on its
                    # own executor instead
                    first = first_line(exc, 200)
                    what = (f"the values that differ between them ({', '.join(self.own_values)}) do not" if self.own_values
                            else "their local update does not")
                    self._go_solo(sorted(self.specs), f"{what} vectorise ({type(exc).__name__}: {first})")
                    for member, jobs in batch.items():
                        self.results[member] = self.solo[member].run(jobs)
        except (Interrupted, KeyboardInterrupt):  # a second Ctrl-C in the serving thread: it stops too
            for member in batch:  # and the runs stop as at their next batch
                self.results[member] = self._abandoned()
            self.cond.notify_all()
            raise
        except BaseException as exc:  # noqa: BLE001 - every run of the call fails with it
            for member in batch:
                self.results[member] = exc
        self.cond.notify_all()

    def _start(self) -> None:
        """Starts the shared executor on the runs' training sets side by side, or, when the
        runs do not fit one call, each run on an executor of its own (saying why)."""
        members = sorted(self.specs)
        specs = [self.specs[m][0] for m in members]
        strategies = [st if st is not None else spec.strategy.build() for spec, st in (self.specs[m] for m in members)]
        problem, lifted = shape_mismatch(specs), None
        if problem is None:
            lifted, problem = shared_local(strategies)
        if problem is not None:
            self._go_solo(members, problem)
            return
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        self.offsets, at = {}, 0
        for m, spec in zip(members, specs):
            same = next((i for i, (x, y) in enumerate(zip(xs, ys))
                         if x.shape == spec.x_train.shape and torch.equal(x, spec.x_train) and torch.equal(y, spec.y_train)),
                        None)
            if same is not None:
                self.offsets[m] = sum(len(x) for x in xs[:same])
                continue
            self.offsets[m] = at
            xs.append(spec.x_train)
            ys.append(spec.y_train)
            at += len(spec.x_train)
        # the local settings that differ between runs travel with each job (`split_job_hp`), and so
        # do the values a lifted local update captures
        differ = [f for f in JOB_HP_FIELDS if len({float(getattr(spec.hp, f)) for spec in specs}) > 1]
        self.job_hp = {m: {f"{JOB_HP_PREFIX}{f}": float(getattr(spec.hp, f)) for f in differ} for m, spec in zip(members, specs)}
        strategy = strategies[0]
        self.own_values = [f"local.{f}" for f in differ]
        if lifted is not None:
            for m, values in zip(members, lifted.values):
                self.job_hp[m].update({f"{CAPTURED_PREFIX}{i}": v for i, v in enumerate(values)})
            strategy = with_lifted_local(strategy, lifted)
            self.own_values += [f"captured {n}" for n in sorted(set(lifted.names))]
        # a cohort that does not vectorise raises (NotVectorisable) and the runs go separately:
        # run client by client inside the shared call, its jobs would draw from the shared call's
        # job ids and the first run's seed
        self.vmap.on_unsupported = "error"
        if not self.own_values:
            self.job_hp = {}
        shared = replace(specs[0], x_train=torch.cat(xs) if len(xs) > 1 else xs[0],
                         y_train=torch.cat(ys) if len(ys) > 1 else ys[0])
        self.vmap.start(shared, strategy)
        if self.vmap.randomness != "error":
            self.print_line(f"sweep: executor.randomness={self.vmap.randomness!r}: random layers draw per "
                            "vectorised call, so these runs are reproducible but not equal to separate runs")

    def _go_solo(self, members: Sequence[int], reason: str) -> None:
        """From now on every run of `members` runs on an executor of its own; says why."""
        self.print_line(f"sweep: running these {len(members)} runs separately: {reason}")
        self.solo = {}
        for m in members:
            self.solo[m] = build_executor(self.configs[m])
            self.solo[m].start(*self.specs[m])
        self.offsets = {}

    def _run_shared(self, batch: Mapping[int, Sequence[Job]]) -> None:
        """Runs every member's jobs as one vmap call (as few as the cohort signatures allow):
        the members' batches side by side as one `JobBatch`, under the shared call's job ids."""
        parts = {m: JobBatch.of(jobs) for m, jobs in batch.items()}
        base = self.next_id
        total = sum(len(p) for p in parts.values())
        orders = _RunsOrders(base, self.offsets)  # for jobs whose hashed orders the device computes
        deferred = [p.indices is None for p in parts.values() if len(p)]
        on_device = any(deferred)  # the runs share local.shuffle (`why_not`): all hashed on the device, or none
        if on_device != all(deferred):
            raise RuntimeError("runs of one shared call differ in where their batch orders are drawn")
        payloads: list[Payload] = []
        indices: list[np.ndarray] = []
        run_orders: list[Any] = []
        for member, part in parts.items():
            n, off = len(part), self.offsets[member]
            own = part.payload_list()
            if self.job_hp and n:  # the run's own local settings travel as payload extras
                hp, made = self._hp_extras(member, own[0].params), {}
                own = [made.setdefault(id(p), Payload(p.params, {**p.extras, **hp})) for p in own]
            payloads += own
            run_orders += [part.orders] * n
            if not on_device:  # each job's indices, shifted to the run's rows of the shared training set
                indices += [ix if off == 0 else np.where(ix >= 0, ix + off, -1) for ix in part.indices]
        self.next_id = base + total
        columns = list(parts.values())
        member_of = np.concatenate([np.full(len(p), m, dtype=np.int64) for m, p in parts.items()])
        own_ids = np.concatenate([p.job_ids for p in columns])
        orders.rows(member_of, own_ids, run_orders)
        stateless = all(p.states is None for p in columns)
        jobs = JobBatch(np.concatenate([p.clients for p in columns]), base + np.arange(total, dtype=np.int64),
                        np.concatenate([p.versions for p in columns]), np.concatenate([p.num_samples for p in columns]),
                        np.concatenate([p.shapes for p in columns]).reshape(total, 2), payloads,
                        None if stateless else [st for p in columns for st in p.state_list()],
                        None if on_device else indices, orders if on_device else None)
        # a job's seed (compression draws: `compressors.job_key`) from its run's seed and its id
        # in the run, as the rows of the hashed orders above are mapped back
        seeds = {m: self.specs[m][0].seed for m in batch}
        self.vmap.job_seeds = lambda job_ids: np.array(
            [key(seeds[int(orders.members[at])], "job", int(orders.own_ids[at]))
             for at in (job_ids - base).tolist()], dtype=np.int64)
        merged = self.vmap.run(jobs)
        rows = merged.jobs - base
        members = member_of[rows]
        own = own_ids[rows]
        for member in batch:
            mine = np.flatnonzero(members == member)
            self.results[member] = merged.take(mine).replace(jobs=own[mine])

    def _hp_extras(self, member: int, like: Tensor) -> dict[str, Tensor]:
        """`member`'s own local settings as 0-d tensors of `like`'s dtype and device (made once)."""
        key = (member, like.dtype, like.device)
        got = self._hp_tensors.get(key)
        if got is None:
            got = self._hp_tensors[key] = {k: torch.tensor(v, dtype=like.dtype, device=like.device)
                                           for k, v in self.job_hp[member].items()}
        return got

    def evaluate(self, member: int, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int,
                 cache: dict) -> dict[str, float | None]:
        """Evaluates on the executor's device, keeping `member`'s test set there (`cache`), in
        the serving thread. Call holding the baton."""
        return self._on_server(lambda: self._evaluate(member, task, params, x, y, batch_size, cache))

    def _evaluate(self, member: int, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int,
                  cache: dict) -> dict[str, float | None]:
        if self.solo is not None:
            return self.solo[member].evaluate(task, params, x, y, batch_size)
        device = resolve_device(self.vmap.device_name)
        if device.type == "cpu":
            return task.evaluate(params, x, y, batch_size)
        if cache.get("of") != (id(x), id(y)):
            cache.update({"of": (id(x), id(y)), "x": x.to(device), "y": y.to(device), "task": task.with_module(
                copy.deepcopy(task.module).to(device))})
        with precision(self.vmap.precision, device.type):
            return cache["task"].evaluate(params.to(device), cache["x"], cache["y"], batch_size)


class _RunsOrders:
    """The hashed batch orders (`local.shuffle: hash`) of a shared call's jobs, computed on the
    device as each run's own executor would: each job's by its run's `DeviceOrders` from its
    own id in the run, shifted to the run's rows of the shared training set. Stands in for a
    `DeviceOrders` as the orders of the shared call's `JobBatch` (whose job ids are the call's)."""

    def __init__(self, base: int, offsets: Mapping[int, int]):
        self.base = base  # the shared call's first job id
        self.offsets = offsets

    def rows(self, members: Sequence[int], own_ids: Sequence[int], orders: Sequence[Any]) -> None:
        """Sets, for each of the call's jobs in order, its run, its id in the run and its run's orders."""
        self.members = np.asarray(members, dtype=np.int64)
        self.own_ids = np.asarray(own_ids, dtype=np.int64)
        self.orders = list(orders)

    def cohort(self, clients: np.ndarray, job_ids: np.ndarray, rows: int | None = None) -> Tensor:
        """As `DeviceOrders.cohort`: the [rows, K, B] indices of jobs (clients[i], job_ids[i]),
        padding rows all −1."""
        at = np.asarray(job_ids, dtype=np.int64) - self.base
        members = self.members[at]
        cut = [0, *(np.flatnonzero(np.diff(members)) + 1).tolist(), len(at)]  # runs of one member
        pieces = []
        for i, j in zip(cut[:-1], cut[1:]):
            out = self.orders[at[i]].cohort(clients[i:j], self.own_ids[at[i:j]])
            off = self.offsets[int(members[i])]
            pieces.append(out if off == 0 else torch.where(out >= 0, out + off, out))
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if rows is not None and rows > len(at):
            out = torch.cat([out, out.new_full((rows - len(at), *out.shape[1:]), -1)])
        return out

    def host(self, client: int, job_id: int) -> np.ndarray:
        """One job's indices computed on the host."""
        at = job_id - self.base
        out = self.orders[at].host(client, int(self.own_ids[at]))
        off = self.offsets[int(self.members[at])]
        return out if off == 0 else np.where(out >= 0, out + off, -1)


class MemberExecutor(Executor):
    """One run's executor in a vectorised group: its jobs go to the group's `SharedVmap`. Hashed
    batch orders are left to the shared executor's device, as a run's own executor does."""

    def __init__(self, shared: SharedVmap, member: int):
        self.shared = shared
        self.member = member
        self._pending: list[Job] = []
        self._done: dict[int, Contributions] = {}
        self._test: dict = {}
        self.order_device = resolve_device(shared.vmap.device_name)
        graphs = shared.vmap.graphs  # as the shared executor's cohorts (`VmapExecutor.start`)
        self.order_graphs = self.order_device.type != "cpu" if graphs is None else bool(graphs)

    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        self.shared.specs[self.member] = (spec, strategy)

    @property
    def model_device(self) -> torch.device | None:  # type: ignore[override]
        vmap = self.shared.vmap
        device = resolve_device(vmap.device_name)
        return device if vmap.keep_on_device and device.type != "cpu" else None

    def submit(self, job: Job) -> None:
        self._pending.append(job)

    def result(self, job_id: int) -> Contributions:
        if job_id not in self._done:
            if all(j.job_id != job_id for j in self._pending):
                raise KeyError(f"job {job_id} was not submitted")
            jobs, self._pending = self._pending, []
            self._done.update((int(r.jobs[0]), r) for r in self.shared.exchange(self.member, jobs).split())
        return self._done.pop(job_id)

    def discard(self, job_id: int) -> None:
        if self._done.pop(job_id, None) is None:
            self._pending = [j for j in self._pending if j.job_id != job_id]

    def run(self, jobs: Sequence[Job]) -> Contributions:
        if self._pending:
            return super().run(jobs)
        return self.shared.exchange(self.member, jobs)

    def evaluate(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float | None]:
        return self.shared.evaluate(self.member, task, params, x, y, batch_size, self._test)

    def close(self) -> None:
        self.shared.leave(self.member)


def run_together(configs: Sequence[Any], work: Callable[[int, MemberExecutor], T],
                 print_line: Callable[[str], Any] = print) -> tuple[list[T | None], int | None]:
    """Calls ``work(i, executor)`` for every run i of `configs` (fedsim Configs that passed
    `why_not`), each in a thread of its own holding the baton, with `executor` its member of
    one `SharedVmap`; `work` builds and drives run i on it, while the calling thread runs the
    shared calls and the evaluations (`SharedVmap.serve`). SIGINT and SIGTERM make every run
    stop at its next batch (writing a checkpoint); a second one raises Interrupted at once,
    even while a run is busy in its own code (the runs still stop at their next batch, in the
    background). Returns what each `work` returned (None where it raised) and the signal that
    asked the runs to stop (None if none did)."""
    from .sweep import StopRequest

    shared = SharedVmap(configs, print_line)
    results: list[T | None] = [None] * len(configs)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        with shared.cond:  # the baton: released only while waiting for the other runs
            try:
                results[i] = work(i, MemberExecutor(shared, i))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                errors.append(exc)
            finally:
                shared.leave(i)

    class Stop(StopRequest):
        def _handler(self, signum: int, frame: Any) -> None:
            if shared.stop_signal is not None:  # a second Ctrl-C: do not wait for the runs
                raise Interrupted("sweep stopped at once by a second interrupt; each run's newest checkpoint is "
                                  "kept: run the same sweep again to resume them")
            super()._handler(signum, frame)
            shared.interrupt(signum)

    stop = Stop(lambda: ())
    threads = [threading.Thread(target=body, args=(i,), name=f"fedsim-vectorised-{i}", daemon=True)
               for i in range(len(configs))]
    with stop:
        shared.serve(lambda: [t.start() for t in threads])  # the shared calls run in this thread
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)  # wakes for signals
    shared.close()
    if errors and stop.signal is None:
        raise errors[0]
    return results, stop.signal


def run_group(source: str | Mapping[str, Any], runs: Sequence[Any], out: Path, configs: Sequence[Any],
              on_done: Callable[[Any], None], print_line: Callable[[str], Any] = print) -> tuple[list[Any], int | None]:
    """Runs the sweep runs `runs` (whose loaded `configs` passed `why_not`) as one vectorised
    group, each into out / its name as `sweep.run_one` does (skipped, resumed or started);
    calls `on_done` as each ends. Returns the outcomes in the runs' order and the signal that
    asked the sweep to stop (None if none did)."""
    from .sweep import run_one

    def work(i: int, executor: MemberExecutor) -> Any:
        outcome = run_one(source, runs[i], out / runs[i].name, executor=executor)
        on_done(outcome)
        return outcome

    return run_together(configs, work, print_line)
