"""The sharpness-aware minimisation (SAM) step direction (Foret, Kleiner, Mobahi, Neyshabur,
ICLR 2021, arXiv 2010.01412), as a `direction` for `fedsim.local.sgd_steps`.

g = ∇f(y; ξ), ε = ρ·g / (‖g‖₂ + 1e-12) with the norm over *all* parameters, and the step
direction is ∇f(y + ε; ξ) on the same mini-batch ξ — as in the reference optimiser
`davda54/sam` (``first_step``: ``scale = rho / (grad_norm + 1e-12)``) that the DFedSAM code
base uses. The reported loss is the one at y (before the perturbation).
"""
from __future__ import annotations

from . import vec
from .local import Direction
from .strategy import Batch, GradFn, Tensor

EPS = 1e-12


def sam(rho: float) -> Direction:
    """Returns the SAM direction with radius ρ (ρ = 0 gives the plain gradient, bit for bit)."""

    def direction(y: Tensor, batch: Batch, grad_fn: GradFn, k: int) -> tuple[Tensor, Tensor]:
        g, loss = grad_fn(y, batch)
        eps = (rho / (vec.norm(g) + EPS)) * g
        g_sam, _ = grad_fn(y + eps, batch)
        return g_sam, loss

    return direction
