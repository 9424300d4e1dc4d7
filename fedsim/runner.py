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
from .clock import to_seconds, to_ticks
from .config.load import Config, load_config
from .data import build_federated_data
from .errors import ConfigError, DivergenceError, FedsimError, Interrupted
from .executors.base import Executor, WorkerSpec, build_executor
from .outputs import EventLog, JsonlLog, prepare_run_dir, read_jsonl, write_atomic, write_config, write_summary
from .protocols.base import Protocol, ProtocolState, RunContext
from .state_store import ClientStateStore
from .strategy import LocalHP, Strategy
from .system.population import Population
from .task import build_task


@dataclass
class DriverState:
    """The driver's own bookkeeping, checkpointed with the protocol state."""

    next_eval: int | None  # next evaluation tick (time-based evaluation), else None
    last_rounds: int = 0
    evaluations: int = 0
    checkpoints: int = 0
    wall_offset: float = 0.0  # wall seconds spent before a resume


@dataclass
class Run:
    """A built run: its context and protocol, ready to drive."""

    config: Config
    ctx: RunContext
    protocol: Protocol
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_state: ProtocolState | None = None
    wall_time: float = 0.0


def build(config: Config, protocol: Protocol | None = None) -> Run:
    """Builds data, model, strategy, population, executor and protocol from `config`
    (`protocol`, if given, replaces the config's: e.g. a Flower ServerApp's)."""
    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    data = build_federated_data(config.data, config.partition, config.seed)
    task = build_task(config.model, data.source, config.seed)
    strategy: Strategy = config.strategy.build()
    protocol = protocol if protocol is not None else config.protocol.build()
    if protocol.requires == "server" and not strategy.server_based:
        raise ConfigError(
            "strategy.name",
            f"{config.strategy.name!r} is a decentralized strategy; protocol {config.protocol.name!r} needs a server part",
        )
    if protocol.requires == "decentralized" and not strategy.decentralized:
        raise ConfigError(
            "strategy.name",
            f"{config.strategy.name!r} has no gossip merge rule; protocol {config.protocol.name!r} is decentralized",
        )
    population = Population.build(config.system, data.num_clients, config.seed)
    executor: Executor = build_executor(config)
    if executor.on_client_error == "drop" and not protocol.drops_failed_jobs:
        raise ConfigError("executor.on_client_error",
                          f"protocol {config.protocol.name!r} cannot drop a client whose code failed; use 'stop'")
    hp = LocalHP(config.local.lr, config.local.momentum, config.local.weight_decay)
    executor.start(WorkerSpec(task, data.x_train, data.y_train, config.strategy, hp, config.seed), strategy)
    budget = config.run.state_memory_mb
    store = ClientStateStore(int(budget * 2**20) if budget is not None else None, config.run.state_dir)
    ctx = RunContext(config, data, task, strategy, population, executor, store)
    if executor.model_device is not None:  # e.g. vmap with keep_on_device: the server runs there too
        ctx.initial_params = ctx.initial_params.to(executor.model_device)
    protocol.setup(ctx)
    return Run(config, ctx, protocol)


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
    row.update(run.protocol.eval_metrics(ctx, state))
    return row


class _StopFlag:
    """Set by SIGINT/SIGTERM; the driver checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None


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

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
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
    snapshot = DriverState(dstate.next_eval, state.rounds, dstate.evaluations, dstate.checkpoints, wall)
    payload = {
        "format": 1,
        "protocol": run.config.protocol.name,
        "param_dim": ctx.task.layout.dim,
        "protocol_state": state,
        "store": ckpt.store_entry(out_dir, dstate.checkpoints, ctx.store),
        "driver": snapshot,
        "rows": json.dumps(run.rows),
        "events_bytes": events_bytes,
    }
    ckpt.save(out_dir, dstate.checkpoints, payload, run.config.run.keep_checkpoints)


def drive(run: Run, out_dir: Path | None, progress: bool | None = None,
          resume: tuple[ProtocolState, DriverState] | None = None) -> list[dict[str, Any]]:
    """Runs the protocol to its stopping rule, evaluating and checkpointing as configured.

    With `out_dir`, rows go to metrics.jsonl as they are made, events to events.jsonl,
    and checkpoints to checkpoints/. Returns the metrics rows.
    """
    cfg = run.config.run
    ctx, proto = run.ctx, run.protocol
    show = cfg.progress if progress is None else progress
    metrics = JsonlLog(out_dir / "metrics.jsonl") if out_dir else None
    if out_dir and cfg.log_events:
        ctx.events = EventLog(out_dir / "events.jsonl")
    every_tick = to_ticks(cfg.eval_every_time) if cfg.eval_every_time else None
    wall_start = time.perf_counter()
    total = cfg.rounds if cfg.rounds is not None else cfg.time_budget
    bar = tqdm(total=total, disable=not show, unit="round" if cfg.rounds is not None else "s", dynamic_ncols=True)
    flag = _StopFlag()

    if resume is None:
        state = None
        dstate = DriverState(next_eval=every_tick)
    else:
        state, dstate = resume
        proto.resume(ctx, state)

    def wall() -> float:
        return dstate.wall_offset + time.perf_counter() - wall_start

    def record(state: ProtocolState, tick: int) -> None:
        row = evaluate(run, state, tick, wall())
        run.rows.append(row)
        dstate.evaluations += 1
        if metrics:
            metrics.append(row)
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
        if cfg.rounds is not None:
            bar.update(state.rounds - bar.n)
        else:
            bar.update(min(to_seconds(state.time), cfg.time_budget) - bar.n)

    try:
        with _catch_signals(flag):
            if state is None:
                state = proto.init(ctx)
                record(state, state.time)
            advance_bar(state)
            while not state.finished:
                if flag.signal is not None:
                    if out_dir:
                        _write_checkpoint(run, out_dir, state, dstate, wall())
                    name = signal.Signals(flag.signal).name
                    hint = f"; resume with: fedsim resume {out_dir}" if out_dir else ""
                    raise Interrupted(f"stopped by {name} at round {state.rounds} (checkpoint written){hint}")
                if every_tick is not None:
                    nt = proto.next_time(ctx, state)
                    while nt is not None and nt > dstate.next_eval and dstate.next_eval <= ctx.budget_ticks():
                        record_due(state)
                try:
                    state = proto.step(ctx, state)
                except DivergenceError as exc:
                    finite = [r for r in run.rows if math.isfinite(r["test_loss"])]  # the model can blow up first
                    last = finite[-1] if finite else {}
                    shown = {k: last.get(k) for k in ("round", "virtual_time", "test_accuracy", "test_loss")}
                    kept = " (last checkpoint kept)" if out_dir and ckpt.list_checkpoints(out_dir) else ""
                    raise DivergenceError(f"{exc}; last finite metrics: {shown}{kept}") from None
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
    finally:
        bar.close()
        ctx.executor.close()
        ctx.store.close()
        if metrics:
            metrics.close()
        if ctx.events is not None:
            ctx.events.close()
    run.final_state = state
    run.wall_time = wall()
    return run.rows


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
    torch.save(run.protocol.eval_params(run.ctx, state).detach().cpu(), out_dir / "final_model.pt")
    from .plots import curves  # matplotlib is slow to import; Flower's per-job processes never plot

    curves(out_dir, run.rows)


@contextmanager
def _write_errors(out_dir: Path | None) -> Iterator[None]:
    """Turns a failed write into the run folder (a full disk, a lost mount) into one line that
    says what was kept; checkpoints are written atomically, so the newest one is whole."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, ConnectionError) or exc.errno is None:  # not a file system error
            raise
        if out_dir is None or not ckpt.list_checkpoints(out_dir):
            raise FedsimError(f"a write failed: {exc}") from None
        raise FedsimError(f"cannot write the run folder: {exc}; its newest checkpoint is kept, "
                          f"resume with: fedsim resume {out_dir}") from None


def execute(config: Config, out_dir: Path | None, overwrite: bool = False, progress: bool | None = None,
            protocol: Protocol | None = None) -> Run:
    """Builds and runs `config` (with `protocol` instead of the config's, if given); with
    `out_dir`, writes the whole run folder. Returns the Run."""
    run = build(config, protocol)
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        prepare_run_dir(out_dir, overwrite)
        write_config(out_dir, config.resolved())
        if config.run.state_dir is None:  # spilled client state lives in the run folder
            run.ctx.store.spill_root = out_dir
    with _write_errors(out_dir), _no_files_for_a_refused_config(run, out_dir, created):
        drive(run, out_dir, progress)
        if out_dir is not None:
            _finish(run, out_dir)
    return run


@contextmanager
def _no_files_for_a_refused_config(run: Run, out_dir: Path | None, created: bool) -> Iterator[None]:
    """A config error found while starting the protocol (before its first evaluation) is
    reported like one found while building: what this run wrote is removed (the folder too,
    if this run created it)."""
    try:
        yield
    except ConfigError:
        if out_dir is not None and not run.rows:
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                for item in out_dir.iterdir():
                    shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        raise


def resume(out_dir: Path, progress: bool | None = None) -> Run:
    """Continues the run in `out_dir` from its newest valid checkpoint and finishes it."""
    cfg_path = out_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FedsimError(f"{out_dir} is not a run folder (no config.yaml)")
    config = load_config(cfg_path)
    payload, path = ckpt.load_latest(out_dir, trusted=config.plugins)
    run = build(config)
    if config.run.state_dir is None:  # spilled client state lives in the run folder
        run.ctx.store.spill_root = out_dir
    if payload.get("protocol") != config.protocol.name:
        raise FedsimError(f"{path.name} was written by protocol {payload.get('protocol')!r}, config says {config.protocol.name!r}")
    if payload.get("param_dim") != run.ctx.task.layout.dim:
        raise FedsimError(
            f"{path.name} holds a model of {payload.get('param_dim')} parameters; the config's model has {run.ctx.task.layout.dim}"
        )
    ckpt.restore_store(out_dir, payload["store"], run.ctx.store)
    run.rows = json.loads(payload["rows"])
    write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.rows))
    events = out_dir / "events.jsonl"
    if events.exists():
        with events.open("r+b") as fh:
            fh.truncate(int(payload["events_bytes"]))
    with _write_errors(out_dir):
        drive(run, out_dir, progress, resume=(payload["protocol_state"], payload["driver"]))
        _finish(run, out_dir)
    return run


__all__ = ["DriverState", "Run", "build", "drive", "evaluate", "execute", "resume", "read_jsonl"]
