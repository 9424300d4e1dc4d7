"""Builds a run from its config and drives its protocol: evaluation, checkpoints, outputs.

Everything is built (and so validated) before the run folder is created, so a bad config
or a missing dataset never leaves a half-written folder behind. `resume` continues a run
folder from its newest valid checkpoint; the resumed run's metrics (apart from wall time)
and final model equal those of a run that never stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import stopping
from .client_eval import ClientEvaluation, FineTune
from .clock import to_seconds, to_ticks
from .config.load import Config, load_config
from .data import build_federated_data
from .data.base import FederatedData
from .data.image_cache import check_executor
from .divergence import chance_accuracy, diverged, last_finite, shown
from .errors import ConfigError, DivergenceError, FedsimError, Interrupted, NoProgressError, StepAbandoned
from .executors.base import Executor, WorkerSpec, build_executor
from .frozen_objects import objects_frozen
from .loggers import MetricsLog, check_loggers
from .outputs import (EventLog, RunDirLock, check_run_dir, empty_folder, folder_write_problem, prepare_run_dir,
                      read_jsonl, write_atomic, write_config, write_summary)
from .protocols.base import Protocol, ProtocolState, RunContext
from .protocols.clocks import Clock, VirtualClock
from .stall import StallWatch, check_horizon, warn_if_nothing_done
from .rng import initialised_cuda, key, keyed_torch, set_torch_states, torch_states
from .state_store import ClientStateStore
from .state_types import checkpointable
from .privacy import sampling_problem
from .wrappers import build_strategy as build_with_context
from .strategy import LocalHP, Strategy, StrategyContext, kind_of
from .system.population import Population
from .augment import from_config as augment_from_config
from .task import build_task


@checkpointable
@dataclass
class DriverState:
    """The driver's own bookkeeping, checkpointed with the protocol state."""

    next_eval: int | None  # next evaluation tick (time-based evaluation), else None
    last_rounds: int = 0
    evaluations: int = 0
    checkpoints: int = 0
    wall_offset: float = 0.0  # wall seconds spent before a resume
    stall: dict[str, int] = field(default_factory=dict)  # what the StallWatch has seen
    rng: list | None = None  # the driver's torch generator states (see `drive`); None: start keyed


@dataclass
class Run:
    """A built run: its context and protocol, ready to drive."""

    config: Config
    ctx: RunContext
    protocol: Protocol
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_state: ProtocolState | None = None
    wall_time: float = 0.0
    client_eval: ClientEvaluation | None = None  # per-client test sets, when the data has them


def build(config: Config, clock: Clock | None = None, executor: Executor | None = None,
          data: FederatedData | None = None) -> Run:
    """Builds data, model, strategy, clock, executor and protocol from `config`. By default the
    clock is virtual (the population's behaviour models) and the executor the config's; a
    deployment passes its own (a Flower ServerApp: the wall clock and its SuperNodes), and
    `data` instead of the config's when the server has none (the data is on the nodes)."""
    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    check_loggers(config.run.loggers)
    if config.run.state_dir is not None:
        problem = folder_write_problem(Path(config.run.state_dir))
        if problem:
            raise ConfigError("run.state_dir", f"cannot write to {config.run.state_dir} ({problem})")
    if data is None:
        data = build_federated_data(config.data, config.partition, config.seed)
    check_executor(data.source.info, config.executor.name)
    task = build_task(config.model, data.source, config.seed, config.data.common)
    protocol = config.protocol.build()
    strategy: Strategy = build_strategy(config, protocol, data.num_clients)
    check_pairing(config, strategy, protocol)
    strategy = task.prepare(strategy)  # carries BatchNorm running statistics, if the model has them
    if clock is None:  # simulated: virtual time from the population's behaviour models
        population = Population.build(config.system, data.num_clients, config.seed)
        if not protocol.clock_runs_alone:
            model_bytes = task.layout.dim * torch.empty(0, dtype=task.dtype).element_size()
            check_horizon(config, population, data.samples_per_client(), model_bytes)
        clock = VirtualClock(population)
        data = with_adversary(population, data, protocol, strategy)
    executor = executor if executor is not None else build_executor(config)
    if executor.on_client_error == "drop" and not protocol.drops_failed_jobs:
        raise ConfigError("executor.on_client_error",
                          f"protocol {config.protocol.name!r} cannot drop a client whose code failed; use 'stop'")
    hp = LocalHP(config.local.lr, config.local.momentum, config.local.weight_decay)
    augment = augment_from_config(config.data.common, data.source.input_shape)
    executor.start(WorkerSpec(task, data.x_train, data.y_train, config.strategy, hp, config.seed, data.num_clients,
                              augment), strategy)
    budget = config.run.state_memory_mb
    budget = int(budget * 2**20) if budget is not None else None
    store = ClientStateStore(budget, config.run.state_dir)
    memory = ClientStateStore(budget, config.run.state_dir)
    ctx = RunContext(config, data, task, strategy, clock, executor, store, memory=memory)
    if executor.model_device is not None:  # e.g. vmap with keep_on_device: the server runs there too
        ctx.initial_params = ctx.initial_params.to(executor.model_device)
    protocol.setup(ctx)
    return Run(config, ctx, protocol, client_eval=ClientEvaluation.of(data, task, FineTune.of(config)))


def build_strategy(config: Config, protocol: Protocol, num_clients: int) -> Strategy:
    """Builds the config's strategy, passing a `StrategyContext` to a factory that declares ``ctx``."""
    cohort = protocol.cohort_size(num_clients) if hasattr(protocol, "cohort_size") else None
    problem = sampling_problem(config.protocol.name, config.system.availability.name, cohort)
    return build_with_context(config.strategy, StrategyContext(num_clients, config.seed, config.run.rounds, cohort, problem))


def with_adversary(population: Population, data: Any, protocol: Protocol, strategy: Any) -> Any:
    """Returns `data` with the malicious clients' labels flipped if the attack says so; raises
    ConfigError when the attack cannot run here (update attacks need a server-based strategy
    that receives dense updates, label flipping a classification task)."""
    try:
        data = population.poison(data)
    except ValueError as exc:
        raise ConfigError("system.adversary.name", str(exc)) from None
    if population.attacks_updates and (protocol.strategy_kind != "server" or getattr(strategy, "receive", None)):
        raise ConfigError("system.adversary.name", "update attacks rewrite dense client updates of server-based "
                          "strategies; this strategy sends gossip models or encoded messages (label_flip works here)")
    return data


def check_pairing(config: Config, strategy: Any, protocol: Protocol) -> None:
    """Raises ConfigError unless the strategy is of the kind the protocol drives and declares it."""
    try:
        kind = kind_of(strategy)
    except TypeError as exc:
        raise ConfigError("strategy.name", f"{config.strategy.name!r}: {exc}") from None
    name, needed = config.protocol.name, protocol.strategy_kind
    if kind != needed:
        what = {"server": "a server-based strategy", "gossip": "a gossip (decentralized) strategy"}
        raise ConfigError("strategy.name", f"{config.strategy.name!r} is {what[kind]}; protocol {name!r} needs {what[needed]}")
    if strategy.protocols is not None and name not in strategy.protocols:
        raise ConfigError("protocol.name", f"strategy {config.strategy.name!r} runs under protocol "
                          f"{' or '.join(map(repr, strategy.protocols))}, not {name!r}")


def evaluate(run: Run, state: ProtocolState, at_tick: int, wall: float) -> dict[str, Any]:
    """Evaluates the protocol's model on the global test set and returns a metrics row."""
    ctx = run.ctx
    src = ctx.data.source
    params = run.protocol.eval_params(ctx, state)
    m = ctx.executor.evaluate(ctx.task, params, src.x_test, src.y_test, ctx.run.eval_batch_size)
    row: dict[str, Any] = {
        "round": state.rounds,
        "virtual_time": to_seconds(at_tick),
        "wall_time": wall,
        "test_accuracy": m.pop("accuracy"),
        "test_loss": m.pop("loss"),
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "aggregations": state.aggregations,
    }
    row.update(m)
    if run.client_eval is not None:
        row.update(run.client_eval.row(ctx.task, params, run.protocol.node_params(ctx, state), ctx.run.eval_batch_size,
                                       at_tick))
    row.update(run.protocol.eval_metrics(ctx, state))
    return row


class _StopFlag:
    """Set by SIGINT/SIGTERM; the driver checks it between steps. With `interrupt_waits` the
    signal also ends a step that waits on other processes (fedsim.stopping)."""

    def __init__(self, interrupt_waits: bool = False) -> None:
        self.signal: int | None = None
        self.interrupt_waits = interrupt_waits


@contextmanager
def _catch_signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if flag.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag.signal = signum
        if flag.interrupt_waits:
            stopping.request(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        stopping.clear()
        for sig, h in previous.items():
            signal.signal(sig, h)


def _write_checkpoint(run: Run, out_dir: Path, state: ProtocolState, dstate: DriverState, wall: float) -> None:
    ctx = run.ctx
    events_bytes = 0
    if ctx.events is not None:
        ctx.events._fh.flush()
        events_bytes = ctx.events.path.stat().st_size
    dstate.checkpoints += 1
    # last_rounds = the state's rounds: their evaluation, if due, is done (rows are made before checkpoints)
    snapshot = DriverState(dstate.next_eval, state.rounds, dstate.evaluations, dstate.checkpoints, wall,
                           dict(dstate.stall), torch_states(initialised_cuda()))
    payload = {
        "format": 1,
        "protocol": run.config.protocol.name,
        "param_dim": ctx.task.layout.dim,
        "protocol_state": state,
        "store": ckpt.store_entry(out_dir, dstate.checkpoints, ctx.store),
        "memory": ckpt.store_entry(out_dir, dstate.checkpoints, ctx.memory, "memory"),
        "driver": snapshot,
        "rows": json.dumps(run.rows),
        "events_bytes": events_bytes,
    }
    ckpt.save(out_dir, dstate.checkpoints, payload, run.config.run.keep_checkpoints)


def _diverged(what: str, last: dict[str, Any], label: str, out_dir: Path | None) -> DivergenceError:
    """Returns the one-line DivergenceError: what diverged, the `last` metrics before it (named
    `label`), and whether a checkpoint is kept."""
    kept = " (last checkpoint kept)" if out_dir and ckpt.list_checkpoints(out_dir) else ""
    return DivergenceError(f"{what}; {label}: {shown(last)}{kept}")


def _abandoned(run: Run, out_dir: Path | None, state: ProtocolState | None, dstate: DriverState, wall: float,
               exc: StepAbandoned) -> FedsimError:
    """Returns the error that ends a run whose step gave up waiting for its jobs. Writes a
    checkpoint of the state the step started from when the protocol had not changed it yet
    (`state_kept_while_waiting`); otherwise a resume starts from the newest checkpoint."""
    at = f" at round {state.rounds}" if state is not None else " before the first round"
    note = ""
    if out_dir is not None:
        resume = f"; resume with: fedsim resume {out_dir}"
        if state is not None and run.protocol.state_kept_while_waiting:
            _write_checkpoint(run, out_dir, state, dstate, wall)
            note = f" (checkpoint written){resume}"
        elif ckpt.list_checkpoints(out_dir):
            note = f" (the newest checkpoint is kept){resume}"
        else:
            note = " (no checkpoint was written yet)"
    if exc.signal is not None:
        return Interrupted(f"stopped by {signal.Signals(exc.signal).name}{at}{note}")
    return StepAbandoned(f"{exc}; stopped{at}{note}")


def drive(run: Run, out_dir: Path | None, progress: bool | None = None,
          resume: tuple[ProtocolState, DriverState] | None = None) -> list[dict[str, Any]]:
    """Runs the protocol to its stopping rule, evaluating and checkpointing as configured.

    With `out_dir`, rows go to metrics.jsonl as they are made, events to events.jsonl,
    and checkpoints to checkpoints/. Returns the metrics rows.

    User code that runs here (a strategy's server part, a model's evaluation) and draws from
    torch's global generators gets them keyed by the run's seed, continued across a resume
    (checkpoints hold their state); the caller's generators are put back after.
    """
    cfg = run.config.run
    ctx, proto = run.ctx, run.protocol
    show = cfg.progress if progress is None else progress
    metrics = MetricsLog(out_dir, cfg.loggers, run.rows, run.config.resolved()) if out_dir else None
    if out_dir and cfg.log_events:
        ctx.events = EventLog(out_dir / "events.jsonl")
    every_tick = to_ticks(cfg.eval_every_time) if cfg.eval_every_time else None
    wall_start = time.perf_counter()
    total = cfg.rounds if cfg.rounds is not None else cfg.time_budget
    # a resumed run's bar starts where it stopped (so its rate and ETA count only this session's
    # work); a time budget counts virtual seconds, its rate virtual seconds per wall second
    done = 0 if resume is None else _progress(resume[0], cfg.rounds, cfg.time_budget)
    bar = tqdm(total=total, initial=done, disable=not show, unit="round" if cfg.rounds is not None else "virtual s",
               dynamic_ncols=True)
    flag = _StopFlag(interrupt_waits=proto.state_kept_while_waiting)

    if resume is None:
        state = None
        dstate = DriverState(next_eval=every_tick)
    else:
        state, dstate = resume
        proto.resume(ctx, state)
    watch = StallWatch(run.config, ctx.num_clients, dstate.stall)
    src = ctx.data.source
    chance = chance_accuracy(src.y_test.cpu().numpy()) if src.task == "classification" else None

    def wall() -> float:
        return dstate.wall_offset + time.perf_counter() - wall_start

    def record(state: ProtocolState, tick: int) -> None:
        row = evaluate(run, state, tick, wall())
        run.rows.append(row)
        dstate.evaluations += 1
        if metrics:
            metrics.append(row)
        verdict = diverged(run.rows, cfg, chance)
        if verdict is not None:  # before a checkpoint could hold the diverged model
            raise _diverged(f"{verdict.what}; lower local.lr or the server learning rate", verdict.last,
                            verdict.label, out_dir)
        acc = row.get("test_accuracy")
        bar.set_postfix_str(f"acc={acc:.4f}" if acc is not None else f"loss={row['test_loss']:.4g}")
        if out_dir and cfg.checkpoint_every and dstate.evaluations % cfg.checkpoint_every == 0:
            _write_checkpoint(run, out_dir, state, dstate, wall())

    def record_due(state: ProtocolState) -> None:
        # moves the schedule on before recording, so a checkpoint written by record() does not
        # hold this evaluation as still due (a resumed run would write its row twice)
        tick, dstate.next_eval = dstate.next_eval, dstate.next_eval + every_tick
        record(state, tick)

    def advance_bar(state: ProtocolState) -> None:
        bar.update(_progress(state, cfg.rounds, cfg.time_budget) - bar.n)

    try:
        with _catch_signals(flag), keyed_torch(key(run.config.seed, "driver"), initialised_cuda()), objects_frozen():
            if dstate.rng is not None:
                set_torch_states(dstate.rng, initialised_cuda())
            if state is None:
                state = proto.init(ctx)
                record(state, state.time)
            watch.start(state.rounds, state.time, state.next_job)
            advance_bar(state)
            while not state.finished:
                if flag.signal is not None:
                    if out_dir:
                        _write_checkpoint(run, out_dir, state, dstate, wall())
                    name = signal.Signals(flag.signal).name
                    hint = f"; resume with: fedsim resume {out_dir}" if out_dir else ""
                    raise Interrupted(f"stopped by {name} at round {state.rounds} (checkpoint written){hint}")
                stalled = watch.check(state.rounds, state.time, state.next_job)  # a resumed stall: at once
                if stalled is not None:
                    if out_dir:
                        _write_checkpoint(run, out_dir, state, dstate, wall())
                    kept = f" (checkpoint written in {out_dir})" if out_dir else ""
                    raise NoProgressError(f"no progress: {stalled}; stopped at round {state.rounds}{kept}")
                if every_tick is not None:
                    nt = proto.next_time(ctx, state)
                    while nt is not None and nt > dstate.next_eval and dstate.next_eval <= ctx.budget_ticks():
                        record_due(state)
                try:
                    state = proto.step(ctx, state)
                except DivergenceError as exc:
                    raise _diverged(str(exc), last_finite(run.rows), "last finite metrics", out_dir) from None
                advance_bar(state)
                if every_tick is None and state.rounds != dstate.last_rounds and state.rounds % cfg.eval_every == 0:
                    record(state, state.time)
                dstate.last_rounds = state.rounds
            if every_tick is not None:
                budget = ctx.budget_ticks()
                # stopped by the time budget (a round that would end after it is not performed):
                # the model stands until the budget, and the rows due until then say so; a
                # schedule that completes its last aggregation after the budget ends there
                by_rounds = ctx.out_of_rounds(state)
                end = max(budget, state.time) if math.isfinite(budget) and not by_rounds else state.time
                while dstate.next_eval <= min(end, budget):
                    record_due(state)
                last = run.rows[-1]
                if last["round"] != state.rounds or last["virtual_time"] != to_seconds(end):
                    record(state, end)  # the final model at the end time, off the grid
            elif run.rows[-1]["round"] != state.rounds or run.rows[-1]["virtual_time"] != to_seconds(state.time):
                record(state, state.time)
            warn_if_nothing_done(run.config, state.rounds, state.aggregations, state.time)
    except StepAbandoned as exc:  # a step gave up waiting for its jobs: a signal, or lost workers
        raise _abandoned(run, out_dir, state, dstate, wall(), exc) from None
    finally:
        bar.close()
        ctx.executor.close()
        ctx.store.close()
        ctx.memory.close()
        if metrics:
            metrics.close()
        if ctx.events is not None:
            ctx.events.close()
    run.final_state = state
    run.wall_time = wall()
    return run.rows


def _progress(state: ProtocolState, rounds: int | None, time_budget: float | None) -> float:
    """How far `state` is toward the run's end: rounds done, else virtual seconds (at most the budget)."""
    if rounds is not None:
        return state.rounds
    return min(to_seconds(state.time), time_budget)


def _finish(run: Run, out_dir: Path) -> None:
    state = run.final_state
    assert state is not None
    write_summary(
        out_dir,
        run.rows,
        {
            "aggregations": state.aggregations,
            "rounds": state.rounds,
            "virtual_time": to_seconds(state.time),
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "evaluations": len(run.rows),
            "wall_time": run.wall_time,
        },
    )
    ckpt.save_atomic(run.protocol.eval_params(run.ctx, state).detach().cpu(), out_dir / "final_model.pt")
    from .plots import curves  # matplotlib is slow to import; Flower's per-job processes never plot

    curves(out_dir, run.rows)


def _resume_hint(out_dir: Path | None) -> str:
    """'; resume with: …' where `out_dir` holds a checkpoint, else ''."""
    if out_dir is None or not ckpt.list_checkpoints(out_dir):
        return ""
    return f"; its newest checkpoint is kept, resume with: fedsim resume {out_dir}"


@contextmanager
def _one_line_errors(out_dir: Path | None) -> Iterator[None]:
    """Turns a failed write into the run folder (a full disk, a read-only or lost mount) and a
    second Ctrl-C into one line that says what was kept and, where a checkpoint exists, how to
    resume; checkpoints are written atomically, so the newest one is whole."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"stopped at once by a second interrupt{_resume_hint(out_dir)}") from None
    except OSError as exc:
        if isinstance(exc, ConnectionError) or exc.errno is None:  # not a file system error
            raise
        hint = _resume_hint(out_dir)
        if not hint:
            raise FedsimError(f"a write failed: {exc}") from None
        raise FedsimError(f"cannot write the run folder: {exc}{hint}") from None


def execute(config: Config, out_dir: Path | None, overwrite: bool = False, progress: bool | None = None,
            clock: Clock | None = None, executor: Executor | None = None, data: FederatedData | None = None) -> Run:
    """Builds and runs `config` (on `clock`, `executor` and `data` instead of the defaults, if
    given; see `build`); with `out_dir`, writes the whole run folder, holding its lock. Returns the Run."""
    if out_dir is not None:
        check_run_dir(out_dir, overwrite)  # refused before anything is built
    run = build(config, clock, executor, data)
    if out_dir is None:
        with _one_line_errors(None):
            drive(run, None, progress)
        return run
    try:
        lock = prepare_run_dir(out_dir, overwrite)
    except BaseException:
        run.ctx.executor.close()
        raise
    with lock, _one_line_errors(out_dir), _nothing_left_before_the_first_row(run, out_dir, lock.created):
        write_config(out_dir, config.resolved())
        if config.run.partition_plot:
            from .partition_plot import draw_run_partition  # matplotlib: only when drawing

            draw_run_partition(run.ctx.data, out_dir, f"{config.data.name}, partition {config.partition.name}")
        if config.run.state_dir is None:  # spilled client state lives in the run folder
            run.ctx.store.spill_root = run.ctx.memory.spill_root = out_dir
        drive(run, out_dir, progress)
        _finish(run, out_dir)
    return run


@contextmanager
def _nothing_left_before_the_first_row(run: Run, out_dir: Path, created: bool) -> Iterator[None]:
    """A config error found while starting the protocol (before its first evaluation) is
    reported like one found while building, and a write that fails that early (a full disk
    at config.yaml) leaves nothing either: what this run wrote is removed (the folder too,
    if this run created it; it is fedsim's own run folder in any case)."""
    try:
        yield
    except (ConfigError, OSError, KeyboardInterrupt):
        if not run.rows:
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                empty_folder(out_dir, ignore_errors=True)
        raise


def resume(out_dir: Path, progress: bool | None = None, clock: Clock | None = None, executor: Executor | None = None,
           data: FederatedData | None = None) -> Run:
    """Continues the run in `out_dir` from its newest valid checkpoint and finishes it (on
    `clock`, `executor` and `data` instead of the defaults, if given; see `build`), holding the
    run folder's lock (a folder another process writes is refused); first removes the
    temporary files a killed run left."""
    if not (out_dir / "config.yaml").is_file():
        raise FedsimError(f"{out_dir} is not a run folder (no config.yaml)")
    with _one_line_errors(out_dir), RunDirLock(out_dir):
        ckpt.remove_leftovers(out_dir)
        return _resume(out_dir, progress, clock, executor, data)


def _resume(out_dir: Path, progress: bool | None, clock: Clock | None = None, executor: Executor | None = None,
            data: FederatedData | None = None) -> Run:
    cfg_path = out_dir / "config.yaml"
    config = load_config(cfg_path)
    payload, path = ckpt.load_latest(out_dir)
    run = build(config, clock, executor, data)
    if config.run.state_dir is None:  # spilled client state lives in the run folder
        run.ctx.store.spill_root = run.ctx.memory.spill_root = out_dir
    if payload.get("protocol") != config.protocol.name:
        raise FedsimError(f"{path.name} was written by protocol {payload.get('protocol')!r}, config says {config.protocol.name!r}")
    if payload.get("param_dim") != run.ctx.task.layout.dim:
        raise FedsimError(
            f"{path.name} holds a model of {payload.get('param_dim')} parameters; the config's model has {run.ctx.task.layout.dim}"
        )
    ckpt.restore_store(out_dir, payload["store"], run.ctx.store)
    ckpt.restore_store(out_dir, payload.get("memory", {}), run.ctx.memory)
    run.rows = json.loads(payload["rows"])
    write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.rows))
    events = out_dir / "events.jsonl"
    if events.exists():
        with events.open("r+b") as fh:
            fh.truncate(int(payload["events_bytes"]))
    drive(run, out_dir, progress, resume=(payload["protocol_state"], payload["driver"]))
    _finish(run, out_dir)
    return run


__all__ = ["DriverState", "Run", "build", "drive", "evaluate", "execute", "resume", "read_jsonl"]
