"""CO2 (Sun, Qin, Sun, Li, Li, Shen, Qiao, Zhong — ICLR 2024, arXiv 2401.16265): local
updating with one-step-stale averaging, a staleness-gap penalty and outer-momentum clipping.

Every worker runs τ local steps from the shared anchor x_t; the all-reduce of the result
runs while the next τ steps compute, so outer step t only sees d_{t−1} = x_{t−1} − x̄_{t−1}
(the averaged pseudo-gradient of the previous phase): m ← β·m + d_{t−1}/λ,
m ← clip(m, −φ, φ) element-wise, x_{t+1} = x_t − α·m. β = 0, α = 1, λ = 1 without
staleness is Local SGD (periodic averaging); β > 0 without staleness is SlowMo.

Verified against the authors' code (weigao266/fairscale-CO2, gossip/co2.py,
`_perform_local_optimization`): m ← β·m + (x_anchor − x̄)/λ with a constant gap penalty λ
(`co2_gap_penalty`, default 1), x_anchor ← x_anchor − α·m, workers reset to the anchor;
defaults β = 0.5, α = 1, clip threshold 1 (clipping off). Their `_co2_clip` calls
torch.clamp out of place and drops the result, so clipping is a no-op there; here it clips.
Not verified (paper body not retrievable; reviews confirm Λ_t and φ exist): the paper's
staleness-gap penalty may be adaptive — this implements the released constant λ. Our reading
of "one-step stale": the delayed pseudo-gradient d_{t−1} is applied at the current anchor
(the alternative, x_t − x̄_{t−1}, differs by the anchor's own last move).
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
