"""Differentially private aggregation for any server-based strategy: DP-FedAvg
(McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963) with fixed or adaptive
clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, arXiv 1905.03871).

Wraps an inner strategy. Each client runs the inner local update and clips its update to
norm C (the server publishes C): u_i ← u_i · min(1, C/‖u_i‖). Noise, with multiplier z:

* ``central`` — the server adds one draw ξ ~ N(0, (z·C·max_i w_i)² I) to the aggregate: every
  row gets ξ / Σ_i w_i, so an inner reduction Σ_i w_i u_i (FedAvg, FedAvgM, FedOpt, FedBuff)
  sees exactly Σ_i w_i u_i + ξ. max_i w_i·C bounds one client's influence on that sum.
* ``local`` — every client's clipped update gets its own N(0, (z·C)² I) before it is sent.

Adaptive clipping (Andrew et al., Alg. 1 with geometric updates): each client also sends
b_i = 1[‖u_i‖ ≤ C]; the server sets b̄ = (Σ_i b_i + N(0, σ_b²)) / m and
C ← C · exp(−η_C (b̄ − γ)), tracking the γ-quantile of the update norms. The update noise
then uses z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), so that update and count together cost the privacy
of multiplier z (the paper's Theorem 1).

All noise is keyed by (seed, aggregation version) or (seed, job id), so runs are
executor-independent and resumable. The privacy accountant (fedsim/privacy.py) reports ε at
δ in every metrics row, or null with the reason where its assumptions do not hold.

Deviations: the noise is added to the rows the inner strategy reads rather than inside its
reduction, so only inner strategies whose reduction is linear in the updates get exactly
DP-FedAvg's noise (a robust inner reducer sees shifted rows); the aggregate is normalised by
the protocol's weights of this aggregation, not a fixed expected cohort weight; extras an
inner strategy uploads (SCAFFOLD's Δc_i) are neither clipped nor noised — they are not
covered by the guarantee. Local noise is drawn where the server receives the update (same
result as drawing it on the client; keeps clients vectorisable under vmap).
"""
from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal, NamedTuple, Optional

import numpy as np
import torch

from fedsim import privacy
from fedsim.config import Ge, Gt, Range
from fedsim.contributions import Contributions
from fedsim.registry import STRATEGIES
from fedsim.rng import torch_generator
from fedsim.robust import clip_to_norm
from fedsim.state_types import checkpointable
from fedsim.strategy import (Batches, ClientOutput, ClientState, CombineContext, GradFn, LocalHP, Payload,
                             ServerStrategy, StrategyContext, Tensor)
from fedsim.wrappers import inner_server

CLIP = "dp_clip"  # the published clipping norm, in the payload's extras
UNCLIPPED = "dp_unclipped"  # b_i = 1[‖u_i‖ ≤ C], an uplink extra under adaptive clipping


@checkpointable
class DPState(NamedTuple):
    """The inner strategy's state, the clipping norm C and the aggregations done (accountant steps)."""

    inner: Any
    clip: float
    aggregations: int


def gaussian(shape: torch.Size, std: float, like: Tensor, seed: int, purpose: str, *ids: int) -> Tensor:
    """Returns N(0, std² I) of `shape`, drawn by the generator of (seed, purpose, ids), on `like`'s device and dtype."""
    draw = torch.randn(shape, generator=torch_generator(seed, purpose, *ids), dtype=torch.float64)
    return (std * draw).to(device=like.device, dtype=like.dtype)


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """Returns z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (Andrew et al., Thm. 1); z itself without count noise."""
    if count_noise <= 0 or z <= 0:
        return z
    rest = z ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"count_noise {count_noise} is too small for noise_multiplier {z:.4g}: "
                         f"it needs count_noise > z/2 = {z / 2:.4g}")
    return rest ** -0.5


@STRATEGIES.register("dp")
def dp(
    ctx: Optional[StrategyContext] = None,
    inner: Any = "fedavg",
    clip: Annotated[float, Gt(0)] = 1.0,
    noise_multiplier: Annotated[float, Ge(0)] = 1.0,
    noise: Literal["central", "local"] = "central",
    adaptive_quantile: Annotated[Optional[float], Range(0.0, 1.0)] = None,
    clip_lr: Annotated[float, Gt(0)] = 0.2,
    count_noise: Annotated[float, Ge(0)] = 0.0,
    delta: Annotated[float, Range(0.0, 1.0, open_lo=True, open_hi=True)] = 1e-5,
    target_epsilon: Annotated[Optional[float], Gt(0)] = None,
    accountant: Literal["rdp", "pld"] = "rdp",
    sampling: Literal["fixed", "poisson"] = "fixed",
) -> ServerStrategy:
    """Any server-based strategy with client-level differential privacy (DP-FedAvg; clipping
    fixed or adaptive, Gaussian noise central or local) and a privacy accountant.

    Args:
        inner: The strategy made private: a name or {name: ..., its knobs}.
        clip: Clipping norm C of each client's update (the initial C when adaptive).
        noise_multiplier: z, the noise standard deviation over the clipping norm (0: no noise).
        noise: 'central' (the server noises the aggregate) or 'local' (each client its update).
        adaptive_quantile: γ, the update-norm quantile that adaptive clipping tracks; None
            keeps C fixed.
        clip_lr: η_C, adaptive clipping's geometric learning rate.
        count_noise: σ_b, the noise on the count of unclipped updates (adaptive clipping;
            must exceed z/2 when noise_multiplier > 0).
        delta: δ at which the metrics rows report ε.
        target_epsilon: Calibrate z before the run so that ε at δ after run.rounds rounds is
            this value (replaces noise_multiplier; needs run.rounds and the sync protocol).
        accountant: 'rdp' (Rényi DP) or 'pld' (privacy loss distributions; Poisson sampling only).
        sampling: How the accountant models a round's cohort: 'fixed' (m of N without
            replacement, as the sync protocol samples) or 'poisson' (rows then say not valid).
    """
    base = inner_server(inner, "dp", ctx)
    if base.receive is not None:
        raise ValueError(f"inner strategy {inner!r} sends encoded messages, which cannot be clipped; "
                         "wrap dp in compressed instead (compressed: {inner: dp})")
    adaptive = adaptive_quantile is not None
    seed = ctx.seed if ctx is not None else 0
    local_noise = noise == "local"
    mechanism = None
    if ctx is not None and ctx.cohort is not None:
        mechanism = privacy.Mechanism(noise_multiplier, ctx.num_clients, ctx.cohort, sampling, local_noise)
    if target_epsilon is not None and ctx is not None:
        if ctx.rounds is None:
            raise ValueError("target_epsilon needs run.rounds (the number of aggregations to account for)")
        if ctx.sampling_problem is not None or mechanism is None:
            raise ValueError(f"target_epsilon cannot be calibrated: {ctx.sampling_problem}")
        noise_multiplier = privacy.calibrate(target_epsilon, mechanism, ctx.rounds, delta, accountant)
        mechanism = privacy.Mechanism(noise_multiplier, ctx.num_clients, ctx.cohort, sampling, local_noise)
    z_update = update_noise_multiplier(noise_multiplier, count_noise) if adaptive else noise_multiplier
    not_valid = ctx.sampling_problem if ctx is not None else None
    if not_valid is None and sampling == "poisson" and not local_noise:
        not_valid = "the accountant assumes Poisson sampling; fedsim's protocols sample fixed-size cohorts"
    if adaptive and (local_noise or count_noise == 0):
        not_valid = not_valid or ("adaptive clipping releases the count of unclipped updates, which this "
                                  "accountant does not cover (local noise, or count_noise = 0)")
    if noise_multiplier == 0:
        not_valid = "no noise (noise_multiplier = 0): not differentially private"
    if mechanism is not None and not_valid is None and not privacy.installed():
        not_valid = f"ε is not computed: the accountant {privacy.INSTALL_HINT}"

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        extras = dict(payload.extras)
        bound = extras.pop(CLIP)
        out = base.local(Payload(payload.params, extras), state, batches, grad_fn, hp)
        norm = torch.linalg.vector_norm(out.update)
        sent = {**out.extras, UNCLIPPED: (norm <= bound).to(out.update.dtype)} if adaptive else out.extras
        return ClientOutput(clip_to_norm(out.update, bound.reshape(())), out.state, sent,
                            {**out.metrics, "update_norm": norm})

    def init(params: Tensor) -> DPState:
        return DPState(base.init(params), float(clip), 0)

    def publish(state: DPState) -> Payload:
        p = base.publish(state.inner)
        return Payload(p.params, {**p.extras, CLIP: torch.tensor([state.clip], dtype=p.params.dtype, device=p.params.device)})

    def noised(contribs: Contributions, c: float, version: int) -> Tensor:
        u = contribs.updates
        if z_update <= 0:
            return u
        if local_noise:
            rows = [gaussian(u.shape[1:], noise_multiplier * c, u, seed, "dp/local", int(j)) for j in contribs.jobs]
            return u + torch.stack(rows)
        w = contribs.weights if contribs.weights is not None else np.full(len(contribs), 1.0 / len(contribs))
        xi = gaussian(u.shape[1:], z_update * c * float(np.max(w)), u, seed, "dp/central", version)
        return u + xi / float(np.sum(w))

    def combine(state: DPState, contribs: Contributions, cctx: CombineContext) -> DPState:
        if not len(contribs):
            return state._replace(inner=base.combine(state.inner, contribs, cctx))
        extras = {k: v for k, v in contribs.extras.items() if k != UNCLIPPED}
        ready = contribs.replace(updates=noised(contribs, state.clip, cctx.version), extras=extras)
        new_clip = state.clip
        if adaptive:
            count = float(contribs.extras[UNCLIPPED].sum())
            if count_noise > 0:
                count += float(gaussian(torch.Size([]), count_noise, contribs.updates, seed, "dp/count", cctx.version))
            new_clip = state.clip * math.exp(-clip_lr * (count / len(contribs) - adaptive_quantile))
        return DPState(base.combine(state.inner, ready, cctx), new_clip, state.aggregations + 1)

    def metrics(state: DPState) -> dict[str, Any]:
        out: dict[str, Any] = dict(base.metrics(state.inner)) if base.metrics is not None else {}
        out.update(dp_clip=state.clip, dp_noise_multiplier=noise_multiplier, dp_delta=delta)
        if mechanism is None and not_valid is None:
            return out
        if not_valid is not None:
            out.update(dp_epsilon=None, dp_epsilon_note=not_valid)
        else:
            out["dp_epsilon"] = _epsilon(mechanism, state.aggregations, delta, accountant)
        return out

    return base._replace(local=local, init=init, publish=publish, combine=combine, params=lambda s: base.params(s.inner),
                         metrics=metrics)


@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: privacy.Mechanism, steps: int, delta: float, kind: str) -> float:
    return privacy.epsilon(mechanism, steps, delta, kind)  # type: ignore[arg-type]
