"""Client behaviour models: compute speed, links, availability, dropout.

Each model is a factory registered by name whose knobs are its config; what it returns
answers one question, vectorised over client ids and keyed by (seed, purpose, id, …) so
that it never depends on a shared random stream:

* compute: ``step_time(ids) -> seconds per local step`` (a static per-client profile);
* link: ``transfer_time(ids, bytes_down, bytes_up) -> seconds``;
* availability: ``available(ids, t) -> bool mask`` and ``next_change(t)`` (when to look again);
* dropout: ``drops(ids, job_ids) -> (bool mask, fraction of the job done before the loss)``.

A new model is one function with ``@COMPUTE_MODELS.register("name")`` (or the registry of
its kind) in any module listed under ``plugins:``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Callable

import numpy as np

from .. import rng
from ..config import Ge, Gt, Range
from ..registry import AVAILABILITY_MODELS, COMPUTE_MODELS, DROPOUT_MODELS, LINK_MODELS


@dataclass(frozen=True)
class SystemContext:
    """What a behaviour model gets from the engine."""

    num_clients: int
    seed: int


@dataclass(frozen=True)
class ComputeModel:
    """Seconds per local step of each client: a function of the client ids alone (keyed by
    the seed and the id; `Population` remembers one client's answer)."""

    step_time: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LinkModel:
    """Time to download and upload a job's bytes."""

    transfer_time: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    instant: bool = False  # every transfer takes no time (callers may skip asking)


@dataclass(frozen=True)
class AvailabilityModel:
    """Which clients can be dispatched at virtual time t."""

    available: Callable[[np.ndarray, float], np.ndarray]
    next_change: Callable[[float], float]
    always: bool = False  # every client is available at every time (callers may skip the mask)


@dataclass(frozen=True)
class DropoutModel:
    """Which jobs are lost, and after what fraction of their duration."""

    drops: Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]
    never: bool = False  # no job is ever lost (callers may skip asking)


# ---------------------------------------------------------------- compute
@COMPUTE_MODELS.register("constant")
def constant(ctx: SystemContext, step_time: Annotated[float, Ge(0)] = 0.01) -> ComputeModel:
    """Every client takes the same time per local step.

    Args:
        step_time: Seconds per local step.
    """
    return ComputeModel(lambda ids: np.full(len(ids), step_time))


@COMPUTE_MODELS.register("linear")
def linear(
    ctx: SystemContext,
    slowest: Annotated[float, Gt(0)] = 0.1,
    spread: Annotated[float, Range(0.0, 100.0, open_hi=True)] = 80.0,
) -> ComputeModel:
    """Linearly spaced speeds (Fraboni et al.'s scenario F-X): τ_i = slowest·(1 − i·(X/100)/(N−1)).

    Client 0 is the slowest; client N−1 is X% faster. F-0 is homogeneous.

    Args:
        slowest: Seconds per step of client 0.
        spread: X, how much faster (in %) the fastest client is than the slowest.
    """
    n = max(ctx.num_clients - 1, 1)
    return ComputeModel(lambda ids: slowest * (1.0 - np.asarray(ids) * (spread / 100.0) / n))


@COMPUTE_MODELS.register("lognormal")
def lognormal(
    ctx: SystemContext,
    mean: Annotated[float, Gt(0)] = 0.01,
    sigma: Annotated[float, Ge(0)] = 0.5,
) -> ComputeModel:
    """Per-client step time ~ LogNormal with the given mean: mean·exp(σZ − σ²/2).

    Args:
        mean: Mean seconds per step over the population.
        sigma: σ of log(step time); 0 makes every client equal.
    """
    return ComputeModel(lambda ids: mean * np.exp(sigma * rng.normal(ctx.seed, "compute/lognormal", ids) - sigma**2 / 2))


@COMPUTE_MODELS.register("exponential")
def exponential(ctx: SystemContext, mean: Annotated[float, Gt(0)] = 0.01) -> ComputeModel:
    """Per-client step time ~ Exp(mean) (a heavy share of very fast and some very slow clients).

    Args:
        mean: Mean seconds per step over the population.
    """
    return ComputeModel(lambda ids: -mean * np.log1p(-rng.uniform(ctx.seed, "compute/exponential", ids)))


# ---------------------------------------------------------------- links
@LINK_MODELS.register("ideal")
def ideal(ctx: SystemContext) -> LinkModel:
    """Communication takes no virtual time."""
    return LinkModel(lambda ids, down, up: np.zeros(len(ids)), instant=True)


@LINK_MODELS.register("constant")
def constant_link(
    ctx: SystemContext,
    bandwidth_down: Annotated[float, Gt(0)] = 1e7,
    bandwidth_up: Annotated[float, Gt(0)] = 1e6,
    latency: Annotated[float, Ge(0)] = 0.05,
) -> LinkModel:
    """Every client has the same link: latency + bytes / bandwidth, each way.

    Args:
        bandwidth_down: Download bandwidth in bytes per second.
        bandwidth_up: Upload bandwidth in bytes per second.
        latency: One-way latency in seconds (paid once per direction).
    """
    return LinkModel(lambda ids, down, up: 2 * latency + np.asarray(down) / bandwidth_down + np.asarray(up) / bandwidth_up)


@LINK_MODELS.register("lognormal")
def lognormal_link(
    ctx: SystemContext,
    bandwidth_down: Annotated[float, Gt(0)] = 1e7,
    bandwidth_up: Annotated[float, Gt(0)] = 1e6,
    sigma: Annotated[float, Ge(0)] = 1.0,
    latency: Annotated[float, Ge(0)] = 0.05,
) -> LinkModel:
    """Per-client bandwidths drawn log-normally around the given medians (one factor per client).

    Args:
        bandwidth_down: Median download bandwidth in bytes per second.
        bandwidth_up: Median upload bandwidth in bytes per second.
        sigma: σ of the log bandwidth factor.
        latency: One-way latency in seconds.
    """

    def transfer(ids: np.ndarray, down: np.ndarray, up: np.ndarray) -> np.ndarray:
        factor = np.exp(sigma * rng.normal(ctx.seed, "link/lognormal", ids))
        return 2 * latency + np.asarray(down) / (bandwidth_down * factor) + np.asarray(up) / (bandwidth_up * factor)

    return LinkModel(transfer)


# ---------------------------------------------------------------- availability
@AVAILABILITY_MODELS.register("always")
def always(ctx: SystemContext) -> AvailabilityModel:
    """Every client is always available."""
    return AvailabilityModel(lambda ids, t: np.ones(len(ids), dtype=bool), lambda t: math.inf, always=True)


@AVAILABILITY_MODELS.register("bernoulli")
def bernoulli_availability(
    ctx: SystemContext,
    p_on: Annotated[float, Range(0.0, 1.0, open_lo=True)] = 0.8,
    period: Annotated[float, Ge(1e-9)] = 1.0,
) -> AvailabilityModel:
    """Time is cut into slots of `period`; in each slot each client is on with probability p_on.

    Args:
        p_on: Probability that a client is available in a slot.
        period: Slot length in virtual seconds (at least 1e-9, one tick of the clock).
    """

    def available(ids: np.ndarray, t: float) -> np.ndarray:
        return rng.uniform(ctx.seed, "availability", ids, int(t // period)) < p_on

    return AvailabilityModel(available, lambda t: (math.floor(t / period) + 1) * period)


@AVAILABILITY_MODELS.register("markov")
def markov_availability(
    ctx: SystemContext,
    p_on_off: Annotated[float, Range(0.0, 1.0)] = 0.1,
    p_off_on: Annotated[float, Range(0.0, 1.0, open_lo=True)] = 0.3,
    period: Annotated[float, Ge(1e-9)] = 1.0,
) -> AvailabilityModel:
    """On/off two-state chain per client, one transition per slot, started in its stationary law.

    Args:
        p_on_off: Probability that an available client goes off at the next slot.
        p_off_on: Probability that an unavailable client comes back at the next slot.
        period: Slot length in virtual seconds (at least 1e-9, one tick of the clock).
    """
    stationary_on = p_off_on / (p_on_off + p_off_on)
    # each client's chain so far: the last slot walked (-1: not started) and its state there
    walked = np.full(ctx.num_clients, -1, dtype=np.int64)
    on = np.zeros(ctx.num_clients, dtype=bool)

    def available(ids: np.ndarray, t: float) -> np.ndarray:
        nonlocal walked, on
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and int(ids.max()) >= len(walked):  # ids beyond the population (direct use)
            grow = int(ids.max()) + 1 - len(walked)
            walked, on = np.append(walked, np.full(grow, -1, dtype=np.int64)), np.append(on, np.zeros(grow, dtype=bool))
        slot = int(t // period)
        fresh = np.unique(ids[(walked[ids] < 0) | (walked[ids] > slot)])  # (re)start at slot 0
        if len(fresh):
            on[fresh] = rng.uniform(ctx.seed, "availability/init", fresh) < stationary_on
            walked[fresh] = 0
        behind = np.unique(ids[walked[ids] < slot])
        if len(behind):  # walk them together, one slot at a time, each from where it stopped
            for s in range(int(walked[behind].min()) + 1, slot + 1):
                step = behind[walked[behind] < s]
                u = rng.uniform(ctx.seed, "availability/step", step, s)
                on[step] = np.where(on[step], u >= p_on_off, u < p_off_on)
                walked[step] = s
        return on[ids]

    return AvailabilityModel(available, lambda t: (math.floor(t / period) + 1) * period)


# ---------------------------------------------------------------- dropout
@DROPOUT_MODELS.register("none")
def no_dropout(ctx: SystemContext) -> DropoutModel:
    """No job is ever lost."""
    return DropoutModel(lambda ids, jobs: (np.zeros(len(ids), dtype=bool), np.ones(len(ids))), never=True)


@DROPOUT_MODELS.register("bernoulli")
def bernoulli_dropout(ctx: SystemContext, p: Annotated[float, Range(0.0, 1.0)] = 0.1) -> DropoutModel:
    """Each job is lost with probability p, at a uniformly random point of its duration.

    Args:
        p: Probability that a dispatched job never reports.
    """

    def drops(ids: np.ndarray, jobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lost = rng.uniform(ctx.seed, "dropout", np.asarray(jobs)) < p
        return lost, rng.uniform(ctx.seed, "dropout/when", np.asarray(jobs))

    return DropoutModel(drops)
