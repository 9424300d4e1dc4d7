"""CO2 (Sun, Qin, Sun, Li, Li, Shen, Qiao, Zhong — ICLR 2024, arXiv 2401.16265): local
updating with one-step-stale averaging, a staleness-gap penalty and outer-momentum clipping.

Every worker runs τ local steps from the shared anchor x_t; the all-reduce of the result
runs while the next τ steps compute, so outer step t only sees d_{t−1} = x_{t−1} − x̄_{t−1}
(the averaged pseudo-gradient of the previous phase, taken from the anchor that phase
started at): m_t = β·m_{t−1} + d_{t−1}/λ, m_t ← clip(m_t, −φ, φ) element-wise,
x_{t+1} = x_t − α·m_t. β = 0, α = 1, λ = 1 without staleness is Local SGD (periodic
averaging); β > 0 without staleness is SlowMo.

Which stale step the paper states is not verified: its body (Algorithm 1 and the
staleness-gap penalty's formula) could not be read here — only its abstract, a figure and
the ICLR reviews, which confirm a staleness-gap metric that scales the outer update and an
outer-momentum clip, and that the penalty's analysis assumes a decaying inner learning
rate, so the paper's penalty is probably adaptive where this λ is the released constant. The two readings differ in sign: this file applies the delayed
pseudo-gradient at the current anchor (delayed-SGD style). The released code
(weigao266/fairscale-CO2, gossip/co2.py, `_perform_local_optimization`) computes
m ← β·m + (x_anchor − p)/λ, x_anchor ← x_anchor − α·m with the anchor already moved; if p
is the stale average x̄_{t−1}, that is m_t = β·m_{t−1} + (x_t − x̄_{t−1})/λ
= (β − α/λ)·m_{t−1} + d_{t−1}/λ, since x_t − x̄_{t−1} = d_{t−1} − α·m_{t−1}: with the code's
defaults (β = 0.5, α = 1, λ = 1) the momentum-like term has coefficient −0.5, the
opposite sign. (In the code's default memory-efficient mode p is gathered by a blocking
reduce at the outer step, so there p is the current phase's average and the step is
SlowMo's, without staleness.) Other released details followed: defaults β = 0.5, α = 1,
λ = 1, clip threshold 1 with clipping off; the code's `_co2_clip` calls torch.clamp out of
place and drops the result, so its clipping is a no-op; here it clips.
Simulated on the synchronous protocol (full participation = all workers; the server's
weighted sum = the all-reduce); its clock charges communication after computation, so
CO2's wall-time gain from overlapping them is not modelled, only the staleness.
"""
from __future__ import annotations

from typing import Annotated, NamedTuple, Optional

from fedsim.blocks import weighted_sum
from fedsim.config import Gt, Range
from fedsim.local import plain_sgd
from fedsim.registry import STRATEGIES
from fedsim.contributions import Contributions
from fedsim.strategy import CombineContext, Payload, ServerStrategy, Tensor
from fedsim.state_types import checkpointable


@checkpointable
class CO2State(NamedTuple):
    """Anchor x_t, outer momentum m, and d_t, the average whose all-reduce is still in flight
    (meaningful once `pending`: the first phase's average arrives one outer step late)."""

    anchor: Tensor
    momentum: Tensor
    in_flight: Tensor
    pending: bool


@STRATEGIES.register("co2")
def co2(
    outer_lr: Annotated[float, Gt(0)] = 1.0,
    outer_momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = 0.5,
    gap_penalty: Annotated[float, Gt(0)] = 1.0,
    clip: Annotated[Optional[float], Gt(0)] = None,
    stale: bool = True,
) -> ServerStrategy:
    """CO2: local SGD whose averaging overlaps the next local phase (one outer step stale).

    Args:
        outer_lr: Outer learning rate α.
        outer_momentum: Outer momentum β (authors' code default 0.5).
        gap_penalty: Staleness-gap penalty λ dividing the stale pseudo-gradient (code form).
        clip: Outer-momentum clipping threshold φ (element-wise); null = no clipping.
        stale: Use the previous phase's average (CO2); false = the current one (SlowMo).
    """
    average = weighted_sum()

    def combine(state: CO2State, contribs: Contributions, ctx: CombineContext) -> CO2State:
        if not len(contribs):
            return state
        d = average(contribs)
        if stale and not state.pending:  # the first phase's average has not arrived yet
            return CO2State(state.anchor, state.momentum, d, True)
        used, in_flight = (state.in_flight, d) if stale else (d, state.in_flight)
        m = outer_momentum * state.momentum + used / gap_penalty
        if clip is not None:
            m = m.clamp(-clip, clip)
        return CO2State(state.anchor - outer_lr * m, m, in_flight, stale)

    return ServerStrategy(
        local=plain_sgd(),
        init=lambda x: CO2State(x, x.new_zeros(x.shape), x.new_zeros(x.shape), False),
        publish=lambda s: Payload(s.anchor),
        combine=combine,
        params=lambda s: s.anchor,
        protocols=("sync",),  # the all-reduce of synchronous workers; no asynchronous form is defined
    )
