"""Client-side building blocks: the local SGD loop that strategies shape.

A strategy's local update usually is `sgd_steps` with its own `direction` (SCAFFOLD's
corrected gradient, SAM's perturbed gradient…). Everything here is pure tensor code with
no data-dependent Python branching, so it runs unchanged under ``torch.func.vmap``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .strategy import Batch, Batches, ClientOutput, ClientState, GradFn, LocalHP, LocalUpdate, Payload, Tensor

Direction = Callable[[Tensor, Batch, GradFn, int], "tuple[Tensor, Tensor]"]


def gradient(y: Tensor, batch: Batch, grad_fn: GradFn, k: int) -> tuple[Tensor, Tensor]:
    """The default step direction: the mini-batch gradient at y; returns (direction, loss)."""
    return grad_fn(y, batch)


def local_lr(payload: Payload, hp: LocalHP) -> Tensor | float:
    """Returns the local learning rate: the server's `local_lr` extra if sent, else hp.lr."""
    return payload.extras.get("local_lr", hp.lr)


def sgd_steps(
    x0: Tensor,
    batches: Batches,
    grad_fn: GradFn,
    hp: LocalHP,
    direction: Direction = gradient,
    lr: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs K = batches.num_steps local SGD steps from x0 along `direction`.

    Weight decay is added to the direction, then heavy-ball momentum (buffer starts at
    zero, as a freshly created ``torch.optim.SGD``), then ``y ← y − lr·d``.
    Returns (y_K, mean mini-batch loss over the K steps).
    """
    lr = hp.lr if lr is None else lr
    y = x0
    buf = None
    total = torch.zeros((), dtype=x0.dtype, device=x0.device)
    for k in range(batches.num_steps):
        d, loss = direction(y, batches[k], grad_fn, k)
        y, buf = sgd_step(y, d, buf, hp, lr)
        total = total + loss.detach()
    return y, total / max(batches.num_steps, 1)


def sgd_step(y: Tensor, d: Tensor, buf: Tensor | None, hp: LocalHP, lr: Tensor | float) -> tuple[Tensor, Tensor | None]:
    """One step of `sgd_steps` from y along d: weight decay, heavy-ball momentum (`buf` None
    before the first step, as a fresh ``torch.optim.SGD``), then ``y − lr·d``.

    Returns (new y, new momentum buffer — None without momentum).
    """
    if _active(hp.weight_decay):
        d = _plus_scaled(d, hp.weight_decay, y)
    if _active(hp.momentum):
        buf = d if buf is None else _plus_scaled(d, hp.momentum, buf)
        d = buf
    return _plus_scaled(y, lr, d, negate=True), buf


def _plus_scaled(a: Tensor, c: Tensor | float, b: Tensor, negate: bool = False) -> Tensor:
    """Returns a + c·b (a − c·b with `negate`) in one pass over the tensors instead of two (c·b,
    then the sum): the step's largest elementwise cost when every client holds its own copy of
    the parameters (vmap). `c` is a number or a tensor (a job's own setting)."""
    if isinstance(c, torch.Tensor):
        return torch.addcmul(a, c, b, value=-1 if negate else 1)
    return torch.add(a, b, alpha=-c if negate else c)


def _active(value: Tensor | float) -> bool:
    """Whether a weight decay or momentum term is applied: a nonzero number, or any tensor (a
    job's own setting, one per client under vmap; a zero there gives the same result, since
    ``d + 0·y = d`` and ``0·buf + d = d``)."""
    return isinstance(value, torch.Tensor) or bool(value)


def plain_sgd() -> LocalUpdate:
    """Returns the local update of FedAvg: K SGD steps, upload u = x − y_K."""

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        y, loss = sgd_steps(payload.params, batches, grad_fn, hp, lr=local_lr(payload, hp))
        return ClientOutput(payload.params - y, {}, {}, {"train_loss": loss})

    return local
