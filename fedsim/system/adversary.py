"""Malicious (Byzantine) clients: which clients attack, and what they send instead of their update.

The ``system.adversary`` model names an attack; its common keys pick the malicious clients
(``ids``, or a ``fraction`` of the population chosen by a keyed permutation). A malicious
client trains like any other; the attack then rewrites what it sends (applied to the
protocol's contributions right after the executor returns them, before the strategy sees
them, so it is the same on every executor) or, for label flipping, its training labels.

Attacks on the update u_i of a malicious row (μ, σ: coordinate-wise mean and standard
deviation of the *honest* rows of the same aggregation — the attacker is omniscient, as in
the papers):

* ``sign_flip`` — −λ·u_i;
* ``scale`` — λ·u_i;
* ``gaussian`` — a draw of N(0, σ_n² I), keyed by (seed, job id);
* ``label_flip`` — the client trains on labels y → C − 1 − y (C classes); u_i is its honest update;
* ``alie`` — "a little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): μ − z·σ, with
  z = Φ⁻¹((m − s)/m), s = ⌊m/2 + 1⌋ − b for m rows of which b are malicious (or a given z);
* ``ipm`` — inner-product manipulation (Xie, Koyejo, Gupta, UAI 2019): −ε·μ.

Update attacks need dense uplinks of server-based strategies (not gossip models, not
encoded messages); label flipping works everywhere a classification task runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Annotated, Callable, List, Optional

import numpy as np
import torch

from .. import rng
from ..config import Gt
from ..registry import ADVERSARY_MODELS
from .models import SystemContext

Tensor = torch.Tensor
Attack = Callable[[Tensor, np.ndarray, np.ndarray], Tensor]  # (updates [m, d], malicious [m] bool, job ids [m]) -> updates


@dataclass(frozen=True)
class AdversaryModel:
    """What malicious clients do: rewrite their updates (`attack`) and/or train on flipped labels."""

    attack: Optional[Attack] = None
    flip_labels: bool = False


def malicious_ids(num_clients: int, seed: int, fraction: float, ids: Optional[List[int]]) -> np.ndarray:
    """Returns the sorted ids of the malicious clients: `ids`, else the first round(fraction·N)
    clients of a permutation keyed by (seed, 'adversary'); raises ValueError for an id ≥ N."""
    if ids is not None:
        bad = [i for i in ids if i >= num_clients]
        if bad:
            raise ValueError(f"client id {bad[0]} is not in a population of {num_clients}")
        return np.unique(np.asarray(ids, dtype=np.int64))
    count = int(round(fraction * num_clients))
    return np.sort(rng.numpy_rng(seed, "adversary").permutation(num_clients)[:count]).astype(np.int64)


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Returns the labels y → C − 1 − y."""
    return (num_classes - 1) - y


def honest_moments(updates: Tensor, malicious: np.ndarray) -> tuple[Tensor, Tensor]:
    """Returns the coordinate-wise mean and (population) standard deviation of the honest rows
    (of every row when all are malicious)."""
    keep = torch.as_tensor(~malicious, device=updates.device)
    honest = updates[keep] if bool(keep.any()) else updates
    return honest.mean(dim=0), honest.std(dim=0, unbiased=False)


def _replace_rows(updates: Tensor, malicious: np.ndarray, rows: Tensor) -> Tensor:
    mask = torch.as_tensor(malicious, device=updates.device).unsqueeze(1)
    return torch.where(mask, rows, updates)


Lam = Annotated[float, Gt(0)]


@ADVERSARY_MODELS.register("none")
def none(ctx: SystemContext) -> AdversaryModel:
    """No attack: malicious clients (if any are named) behave honestly."""
    return AdversaryModel()


@ADVERSARY_MODELS.register("sign_flip")
def sign_flip(ctx: SystemContext, scale: Lam = 1.0) -> AdversaryModel:
    """Malicious clients send −λ·u (their update, sign-flipped and scaled).

    Args:
        scale: λ.
    """
    return AdversaryModel(lambda u, bad, jobs: _replace_rows(u, bad, -scale * u))


@ADVERSARY_MODELS.register("scale")
def scale_attack(ctx: SystemContext, scale: Lam = 10.0) -> AdversaryModel:
    """Malicious clients send λ·u (their update, scaled up).

    Args:
        scale: λ.
    """
    return AdversaryModel(lambda u, bad, jobs: _replace_rows(u, bad, scale * u))


@ADVERSARY_MODELS.register("gaussian")
def gaussian(ctx: SystemContext, sigma: Lam = 1.0) -> AdversaryModel:
    """Malicious clients send Gaussian noise N(0, σ² I), keyed by (seed, job id).

    Args:
        sigma: σ of each coordinate.
    """

    def attack(u: Tensor, bad: np.ndarray, jobs: np.ndarray) -> Tensor:
        noise = torch.zeros_like(u)
        for i in np.flatnonzero(bad).tolist():
            gen = rng.torch_generator(ctx.seed, "adversary/gaussian", int(jobs[i]))
            noise[i] = sigma * torch.randn(u.shape[1:], generator=gen, dtype=u.dtype).to(u.device)
        return _replace_rows(u, bad, noise)

    return AdversaryModel(attack)


@ADVERSARY_MODELS.register("label_flip")
def label_flip(ctx: SystemContext) -> AdversaryModel:
    """Malicious clients train on flipped labels y → C − 1 − y (classification data only)."""
    return AdversaryModel(flip_labels=True)


def alie_z(rows: int, malicious: int) -> float:
    """Returns "a little is enough"'s z = Φ⁻¹((m − s)/m), s = ⌊m/2 + 1⌋ − b (0 when that is not in (0, 1))."""
    s = rows // 2 + 1 - malicious
    p = (rows - s) / rows
    return NormalDist().inv_cdf(p) if 0 < p < 1 else 0.0


@ADVERSARY_MODELS.register("alie")
def alie(ctx: SystemContext, z: Optional[float] = None) -> AdversaryModel:
    """"A little is enough" (Baruch et al. 2019): malicious clients send μ − z·σ of the honest updates.

    Args:
        z: How many standard deviations to shift; None: the paper's z from the aggregation's
            number of rows and of malicious rows.
    """

    def attack(u: Tensor, bad: np.ndarray, jobs: np.ndarray) -> Tensor:
        mu, sd = honest_moments(u, bad)
        zz = z if z is not None else alie_z(len(bad), int(bad.sum()))
        return _replace_rows(u, bad, (mu - zz * sd).expand_as(u))

    return AdversaryModel(attack)


@ADVERSARY_MODELS.register("ipm")
def ipm(ctx: SystemContext, epsilon: Lam = 0.5) -> AdversaryModel:
    """Inner-product manipulation (Xie et al. 2019): malicious clients send −ε·μ of the honest updates.

    Args:
        epsilon: ε (small ε hides in the crowd, ε > 1 reverses the mean once averaged).
    """

    def attack(u: Tensor, bad: np.ndarray, jobs: np.ndarray) -> Tensor:
        mu, _ = honest_moments(u, bad)
        return _replace_rows(u, bad, (-epsilon * mu).expand_as(u))

    return AdversaryModel(attack)
