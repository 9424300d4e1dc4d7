"""Builds a run from its config and drives its protocol: evaluation, outputs, progress.

Everything is built (and so validated) before the run folder is created, so a bad config
or a missing dataset never leaves a half-written folder behind.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .clock import to_seconds, to_ticks
from .config.load import Config
from .data import build_federated_data
from .errors import ConfigError
from .executors.base import Executor, WorkerSpec
from .outputs import EventLog, JsonlLog, prepare_run_dir, write_config, write_summary
from .plots import curves
from .protocols.base import Protocol, ProtocolState, RunContext
from .state_store import ClientStateStore
from .strategy import LocalHP, Strategy
from .system.population import Population
from .task import build_task


@dataclass
class Run:
    """A built run: its context and protocol, ready to drive."""

    config: Config
    ctx: RunContext
    protocol: Protocol
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_state: ProtocolState | None = None
    wall_time: float = 0.0


def build(config: Config) -> Run:
    """Builds data, model, strategy, population, executor and protocol from `config`."""
    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    data = build_federated_data(config.data, config.partition, config.seed)
    task = build_task(config.model, data.source, config.seed)
    strategy: Strategy = config.strategy.build()
    protocol: Protocol = config.protocol.build()
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
    executor: Executor = config.executor.build()
    hp = LocalHP(config.local.lr, config.local.momentum, config.local.weight_decay)
    executor.start(WorkerSpec(task, data.x_train, data.y_train, config.strategy, hp, config.seed), strategy)
    ctx = RunContext(config, data, task, strategy, population, executor, ClientStateStore())
    protocol.setup(ctx)
    return Run(config, ctx, protocol)


def evaluate(run: Run, state: ProtocolState, at_tick: int, wall_start: float) -> dict[str, Any]:
    """Evaluates the protocol's model on the global test set and returns a metrics row."""
    ctx = run.ctx
    src = ctx.data.source
    params = run.protocol.eval_params(ctx, state)
    m = ctx.task.evaluate(params, src.x_test, src.y_test, ctx.run.eval_batch_size)
    row: dict[str, Any] = {
        "round": state.rounds,
        "virtual_time": to_seconds(at_tick),
        "wall_time": time.perf_counter() - wall_start,
        "test_accuracy": m.pop("accuracy"),
        "test_loss": m.pop("loss"),
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "aggregations": state.aggregations,
    }
    row.update(m)
    row.update(run.protocol.eval_metrics(ctx, state))
    return row


def drive(run: Run, out_dir: Path | None, progress: bool | None = None) -> list[dict[str, Any]]:
    """Runs the protocol to its stopping rule, evaluating as configured; returns the rows.

    With `out_dir`, rows go to metrics.jsonl as they are made (and events to events.jsonl).
    """
    cfg = run.config.run
    ctx, proto = run.ctx, run.protocol
    show = cfg.progress if progress is None else progress
    metrics = JsonlLog(out_dir / "metrics.jsonl") if out_dir else None
    if out_dir and cfg.log_events:
        ctx.events = EventLog(out_dir / "events.jsonl")
    wall_start = time.perf_counter()
    every_tick = to_ticks(cfg.eval_every_time) if cfg.eval_every_time else None
    total = cfg.rounds if cfg.rounds is not None else cfg.time_budget
    bar = tqdm(total=total, disable=not show, unit="round" if cfg.rounds is not None else "s", dynamic_ncols=True, leave=True)

    def record(state: ProtocolState, tick: int) -> None:
        row = evaluate(run, state, tick, wall_start)
        run.rows.append(row)
        if metrics:
            metrics.append(row)
        if ctx.events is not None:
            ctx.events._fh.flush()
        acc = row.get("test_accuracy")
        bar.set_postfix_str(f"acc={acc:.4f}" if acc is not None else f"loss={row['test_loss']:.4g}")

    try:
        state = proto.init(ctx)
        record(state, state.time)
        next_eval = every_tick
        last_rounds = state.rounds
        while not state.finished:
            if every_tick is not None:
                nt = proto.next_time(ctx, state)
                while nt is not None and nt > next_eval and next_eval <= ctx.budget_ticks():
                    record(state, next_eval)
                    next_eval += every_tick
            state = proto.step(ctx, state)
            if cfg.rounds is not None:
                bar.update(state.rounds - bar.n)
            else:
                bar.update(min(to_seconds(state.time), cfg.time_budget) - bar.n)
            if every_tick is None and state.rounds != last_rounds and state.rounds % cfg.eval_every == 0:
                record(state, state.time)
            last_rounds = state.rounds
        if every_tick is not None:
            end = min(ctx.budget_ticks(), state.time) if math.isfinite(ctx.budget_ticks()) else state.time
            while next_eval <= end:
                record(state, next_eval)
                next_eval += every_tick
        elif run.rows[-1]["round"] != state.rounds or run.rows[-1]["virtual_time"] != to_seconds(state.time):
            record(state, state.time)
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if ctx.events is not None:
            ctx.events.close()
        ctx.executor.close()
    run.final_state = state
    run.wall_time = time.perf_counter() - wall_start
    return run.rows


def execute(config: Config, out_dir: Path | None, overwrite: bool = False, progress: bool | None = None) -> Run:
    """Builds and runs `config`; with `out_dir`, writes the whole run folder. Returns the Run."""
    run = build(config)
    if out_dir is not None:
        prepare_run_dir(out_dir, overwrite)
        write_config(out_dir, config.resolved())
    drive(run, out_dir, progress)
    if out_dir is not None:
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
        torch.save(run.protocol.eval_params(run.ctx, state), out_dir / "final_model.pt")
        curves(out_dir, run.rows)
    return run
