"""Hypergradient learning rates: the building blocks of FedHyper (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156).

The derivative of the loss after an update with respect to the rate η that scaled the
previous update is ≈ −⟨current update, previous update⟩, so a hypergradient step raises η
while consecutive updates are aligned and lowers it while they oscillate.

Sign convention: fedsim's updates are pseudo-gradients u = x − y, the negation of the
paper's Δ = y − x. Every rule here uses inner products of *two* updates (or two step
changes), which are unchanged when both are negated, so the formulas read as in the paper.

Server side: `hypergrad_lr` (an optax-style `Transform`: FedHyper-G, and -GM with momentum)
and `last_update` (keeps the raw aggregate for FedHyper-CL's clients). Client side:
`hyper_sgd_steps`, local SGD whose rate follows FedHyper-CL's per-step multiplier.

Verified against the authors' code (ATP-1010/FedHyper, src/federated_main.py and
src/update.py): G ``agg += ⟨Δ_{t−1}, Δ_t⟩``, η_g = 1 + agg clipped to [0.2, 5], applied to
Δ_t in the same round; GM ``x ← x + Δ_t + a·(Δ_t + 0.9 m_{t−1})``, hypergradient
⟨m_{t−1}, Δ_t⟩, η_g ∈ [0.8, 5]; CL ``γ = min(1.1, 1 + 0.1⟨δ_k, Δ_{t−1}⟩/s + ⟨δ_k, δ_prev⟩)``,
b ← clip(γ b, 0.1, 10), δ_prev starting at Δ_{t−1}. The code's commented-out "normalised"
form adds σ(0.1⟨·,·⟩) ∈ (0, 1), which never decreases η; ours is centred (σ − ½).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, NamedTuple

import torch

from . import vec
from .blocks import Transform
from .errors import ConfigError
from .local import local_lr, sgd_step, sgd_steps
from .strategy import Batches, ClientOutput, ClientState, GradFn, LocalHP, LocalUpdate, Payload, ServerStrategy, Tensor
from .state_types import checkpointable

Normalize = Literal["none", "cosine", "sigmoid"]  # forms of the hypergradient, see `hypergradient`


def hypergradient(a: Tensor, b: Tensor, normalize: str = "none") -> Tensor:
    """Returns the alignment signal of two updates: ⟨a, b⟩ ('none', the paper's form),
    their cosine ('cosine'), or σ(0.1⟨a, b⟩) − ½ ('sigmoid'); 0 when b is zero."""
    if normalize == "cosine":
        return vec.cosine(a, b)
    if normalize == "sigmoid":
        return torch.sigmoid(0.1 * vec.dot(a, b)) - 0.5
    return vec.dot(a, b)


@checkpointable
class HyperLR(NamedTuple):
    """State of `hypergrad_lr`: the current rate and the previous update (or momentum buffer)."""

    lr: Tensor
    trace: Tensor


def hypergrad_lr(
    lr: float = 1.0,
    beta: float = 1.0,
    lo: float = 0.2,
    hi: float = 5.0,
    momentum: float = 0.0,
    normalize: str = "none",
    apply: bool = True,
) -> Transform:
    """Server transform with a hypergradient rate: η ← clip(η + β·h(u_t, m_{t−1}), lo, hi).

    m_t = u_t + μ m_{t−1} (m_t = u_t without momentum); h is `hypergradient`. The step is
    η·u_t without momentum (FedHyper-G) and u_t + (η − 1)·m_t with it (FedHyper-GM as
    released: the momentum term is scaled by η − 1, so η = 1 gives plain averaging).
    With `apply` False the step is u_t unchanged and only the rate is tracked (FedHyper-SL
    turns it into a local learning rate). The first round has m_{−1} = 0, so η stays put.
    """

    def init(params: Tensor) -> HyperLR:
        return HyperLR(torch.tensor(lr, dtype=params.dtype, device=params.device), torch.zeros_like(params))

    def update(u: Tensor, state: HyperLR, params: Tensor) -> tuple[Tensor, HyperLR]:
        eta = (state.lr + beta * hypergradient(u, state.trace, normalize)).clamp(lo, hi)
        trace = u + momentum * state.trace if momentum else u
        if not apply:
            return u, HyperLR(eta, trace)
        return (u + (eta - 1) * trace if momentum else eta * u), HyperLR(eta, trace)

    return Transform(init, update)


def last_update() -> Transform:
    """Identity transform whose state is the last (raw) aggregated update, zeros at first."""
    return Transform(torch.zeros_like, lambda u, state, params: (u, u))


class StepRule(NamedTuple):
    """FedHyper-CL's local-rate multiplier b (per job, starting at 1).

    After each local step δ_k (the parameter change, momentum included) but the first:
    γ = min(cap, 1 + β·(c_g·h(δ_k, u_{t−1}) + h(δ_k, δ_prev))), b ← clip(γ·b, lo, hi),
    δ_prev ← δ_k, with δ_prev = u_{t−1} (the previous global update) before the first one.
    """

    beta: float = 1.0
    global_coef: float = 0.01  # 0.1 / s in the code, s = 10 clients per round
    cap: float = 1.1
    lo: float = 0.1
    hi: float = 10.0
    normalize: str = "none"

    def next(self, b: Tensor, change: Tensor, prev: Tensor, global_prev: Tensor) -> Tensor:
        """Returns the multiplier after a step that changed the parameters by `change`."""
        h = self.global_coef * hypergradient(change, global_prev, self.normalize)
        gamma = (1 + self.beta * (h + hypergradient(change, prev, self.normalize))).clamp(max=self.cap)
        return (gamma * b).clamp(self.lo, self.hi)


def hyper_sgd_steps(
    x0: Tensor, batches: Batches, grad_fn: GradFn, hp: LocalHP, lr: Tensor | float, rule: StepRule, global_prev: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs K local SGD steps from x0 with rate lr·b_k, b_k following `rule`.

    Deviation: the released code skips the adaptation after the first batch of *every*
    epoch; jobs here carry no epoch boundaries, so only the job's first step is skipped.
    Returns (y_K, mean mini-batch loss, the K rates used).
    """
    y, buf, prev = x0, None, global_prev
    b = torch.ones((), dtype=x0.dtype, device=x0.device)
    total = torch.zeros((), dtype=x0.dtype, device=x0.device)
    rates = []
    for k in range(batches.num_steps):
        d, loss = grad_fn(y, batches[k])
        rates.append(lr * b)
        y_new, buf = sgd_step(y, d, buf, hp, rates[-1])
        if k > 0:
            change = y - y_new
            b, prev = rule.next(b, change, prev, global_prev), change
        y = y_new
        total = total + loss.detach()
    return y, total / max(batches.num_steps, 1), torch.stack(rates) if rates else torch.zeros(0)


def hyper_local(rule: StepRule | None = None, lr_lo: float = 0.0, lr_hi: float = math.inf) -> LocalUpdate:
    """Returns FedHyper's client part: K SGD steps, upload u = x − y_K.

    The rate is clip(hp.lr · ρ, lr_lo, lr_hi) when the payload carries FedHyper-SL's
    multiplier ρ (`local_lr_scale`), else `fedsim.local.local_lr`; with a `rule`
    (FedHyper-CL) it then follows the rule's multiplier, fed with the payload's
    `prev_update` u_{t−1}. Metrics: train_loss and local_lr (mean rate over the steps).
    """

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        x = payload.params
        lr = local_lr(payload, hp)
        if "local_lr_scale" in payload.extras:
            lr = (hp.lr * payload.extras["local_lr_scale"]).clamp(lr_lo, lr_hi)
        if rule is None:
            y, loss = sgd_steps(x, batches, grad_fn, hp, lr=lr)
            mean_lr = torch.as_tensor(lr, dtype=x.dtype)
        else:
            y, loss, rates = hyper_sgd_steps(x, batches, grad_fn, hp, lr, rule, payload.extras["prev_update"])
            mean_lr = rates.mean()
        return ClientOutput(x - y, {}, {}, {"train_loss": loss, "local_lr": mean_lr})

    return local


def with_server_extras(
    strategy: ServerStrategy,
    extras: Callable[[Any], Mapping[str, Tensor]],
    metrics: Callable[[Any], Mapping[str, Tensor | float]],
) -> ServerStrategy:
    """Returns an `fl_server` strategy whose payload adds extras(transform state) and whose
    evaluation metrics are metrics(transform state) (tensors turned into floats)."""
    return strategy._replace(
        publish=lambda s: Payload(s.params, dict(extras(s.opt))),
        metrics=lambda s: {k: float(v) for k, v in metrics(s.opt).items()},
    )


def check_bounds(path: str, lo: float, value: float, hi: float) -> None:
    """Raises ConfigError at `path` unless lo <= value <= hi."""
    if not lo <= hi:
        raise ConfigError(path, f"the lower bound {lo} exceeds the upper bound {hi}")
    if not lo <= value <= hi:
        raise ConfigError(path, f"the initial value {value} is outside the bounds [{lo}, {hi}]")
