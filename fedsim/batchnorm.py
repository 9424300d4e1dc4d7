"""BatchNorm running statistics as model state that travels with the parameters.

fedsim keeps a model as one flat vector and trains it with pure functions, so a layer cannot
update its buffers in place as ``nn.BatchNorm`` does. Instead:

* `with_tracked_batchnorm` swaps every ``nn.BatchNorm1d/2d/3d`` with running statistics for a
  `TrackedBatchNorm` (same parameter and buffer names). In training mode it normalises with
  the statistics of the batch's real rows (padding rows, mask 0, are left out) and leaves the
  updated running statistics, ``(1 − m)·running + m·batch`` with the unbiased batch variance
  as torch does, in ``new_stats``; in evaluation mode it uses the running statistics it is
  given, as ``nn.BatchNorm`` does.
* The running means and variances are the last entries of the model's flat vector
  (`Task.layout`), so they are initialised, published, checkpointed and evaluated with the
  parameters. Their gradient is zero.
* `with_running_stats` wraps a strategy's local update: every gradient evaluation continues
  the job's statistics from where the previous one left them (as every forward pass of a torch
  training loop does), and at the end the uplink carries them: with ``bn: global`` the update's
  entries become ``x_start − stats_end`` (server strategies, so averaging the updates averages
  the statistics like the parameters) or ``stats_end`` (gossip strategies, whose update is the
  new parameters); with ``bn: local`` (FedBN, Li et al., 2021, statistics only) each client
  keeps its statistics in its client state (key ``bn_stats``), starts every job from them, and
  sends zeros for them, so the global model's statistics stay as initialised.

The number of batches seen (``num_batches_tracked``) is not carried: it only matters for
``momentum=None`` (a cumulative average), which is refused.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .strategy import Batch, ClientOutput, Payload, Strategy, kind_of

Tensor = torch.Tensor
BN_MODES = ("global", "local")
STATE_KEY = "bn_stats"


class TrackedBatchNorm(nn.Module):
    """BatchNorm whose training-mode forward leaves the new running statistics in
    ``new_stats`` instead of updating its buffers in place; see the module docstring."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.row_mask: Tensor | None = None  # set by the task for the duration of one forward pass
        self.new_stats: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.row_mask is None:
            w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        else:
            w = self.row_mask.to(x.dtype)
        w = w.reshape(-1, *[1] * (x.dim() - 1))
        count = w.sum() * (x[0, 0].numel())
        mean = (x * w).sum(dims) / count.clamp_min(1)
        centred = x - mean.reshape(shape)
        var = (centred * centred * w).sum(dims) / count.clamp_min(1)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        m = self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.new_stats = ((1 - m) * self.running_mean + m * mean.detach(),
                          (1 - m) * self.running_var + m * unbiased.detach())
        return out


def with_tracked_batchnorm(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """Returns (`module`, or a copy of it with every BatchNorm that tracks running statistics
    swapped for a `TrackedBatchNorm`; the names of those statistics' buffers, in module order).
    Raises ConfigError at `model` for a BatchNorm with momentum=None (cumulative averages)."""
    found = [name for name, sub in module.named_modules()
             if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats]
    already = [name for name, sub in module.named_modules() if isinstance(sub, TrackedBatchNorm)]
    if not found:
        return module, [f"{n}.{b}" if n else b for n in already for b in ("running_mean", "running_var")]
    module = copy.deepcopy(module)
    for name in found:
        bn = module.get_submodule(name)
        if bn.momentum is None:
            raise ConfigError("model", f"layer {name!r} is BatchNorm with momentum=None (a cumulative average of "
                                       "every batch); fedsim carries exponential running statistics only: set a momentum")
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, attr, TrackedBatchNorm(bn))
    tracked = [name for name, sub in module.named_modules() if isinstance(sub, TrackedBatchNorm)]
    return module, [f"{n}.{b}" if n else b for n in tracked for b in ("running_mean", "running_var")]


def tracked_layers(module: nn.Module) -> list[TrackedBatchNorm]:
    """Returns the module's TrackedBatchNorm layers in module order."""
    return [sub for sub in module.modules() if isinstance(sub, TrackedBatchNorm)]


StatsGradFn = Callable[[Tensor, Batch], "tuple[Tensor, tuple[Tensor, Tensor]]"]  # -> (grad, (loss, new stats))


def with_running_stats(strategy: Strategy, param_dim: int, mode: str) -> Strategy:
    """Returns `strategy` with its local update wrapped to carry the running statistics held
    in entries ``[param_dim:]`` of the flat model (see the module docstring). The wrapped
    local takes a `StatsGradFn` in place of the plain gradient function; with mode 'local'
    the client state gains ``bn_stats``. Idempotent."""
    if getattr(strategy.local, "carries_running_stats", False):
        return strategy
    if mode not in BN_MODES:
        raise ConfigError("model.bn", f"must be one of {', '.join(BN_MODES)} (got {mode!r})")
    gossip = kind_of(strategy) == "gossip"
    if gossip and mode == "local":
        raise ConfigError("model.bn", "'local' keeps statistics out of the server's average; gossip nodes "
                                      "each hold their own model already: use bn: global")
    inner_local, inner_state = strategy.local, strategy.client_state

    def local(payload: Payload, state: Any, batches: Any, stats_grad_fn: StatsGradFn, hp: Any) -> ClientOutput:
        x0 = payload.params
        own = dict(state)
        stats = [own.pop(STATE_KEY) if mode == "local" else x0[param_dim:]]

        def grad_fn(params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
            grad, (loss, new) = stats_grad_fn(torch.cat([params[:param_dim], stats[0]]), batch)
            stats[0] = new
            return grad, loss

        out = inner_local(payload, own, batches, grad_fn, hp)
        end = stats[0]
        if gossip:
            tail = end
        elif mode == "local":
            tail = torch.zeros_like(end)
        else:
            tail = x0[param_dim:] - end
        new_state = dict(out.state)
        if mode == "local":
            new_state[STATE_KEY] = end
        return ClientOutput(torch.cat([out.update[:param_dim], tail]), new_state, out.extras, out.metrics)

    local.carries_running_stats = True  # type: ignore[attr-defined]
    client_state = inner_state
    if mode == "local":
        def client_state(params: Tensor) -> dict[str, Tensor]:
            base = dict(inner_state(params) or {}) if inner_state is not None else {}
            base[STATE_KEY] = params[param_dim:].clone()
            return base
    return strategy._replace(local=local, client_state=client_state)
