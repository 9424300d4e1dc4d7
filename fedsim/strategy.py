"""The strategy contract: pure functions plus explicit state.

Sign convention (fixed everywhere): an FL client's update is a pseudo-gradient
``u = x_start − y_end`` — the model it received minus the model it ended with. A server
applies ``x ← x − η_g · aggregate(u)``. Gossip merges work on parameters.

A strategy is a `Strategy` named tuple:

* ``local(payload, state, batches, grad_fn, hp) -> ClientOutput`` — the client part. Pure
  over tensors; it gets a gradient function from the engine and never sees an nn.Module,
  so the same code runs client by client, in Ray actors, and under ``torch.func.vmap``.
* ``init(params) -> S``, ``publish(S) -> Payload``, ``combine(S, msgs, ctx) -> S``,
  ``params(S) -> x`` — the server part, for server-based protocols (sync and async). The
  runtime decides *when* combine runs and fills each `Msg` (weight, staleness, base).
* ``merge(models, weights, own, layout) -> params`` — the receiver rule of decentralized
  protocols, pure over stacks: ``models [m, d]`` are every model involved, ``weights [k, m]``
  (dense or sparse) give receiver r's weight on each of them in row r, ``own [k]`` is the
  index of receiver r's own model in `models`, and ``layout`` (`fedsim.params.ParamLayout`)
  cuts a row into the model's tensors for per-tensor rules. Returns the ``[k, d]`` merged
  models. Plain mixing is ``weights @ models``: a synchronous gossip step over all n nodes is
  one (sparse) matmul (k = m = n, own = arange(n)); an asynchronous receiver merges its own
  model with its buffer (k = 1, own = [0]). See `fedsim.merge`.
* ``gossip_steps`` — Q, the gossip (merge) steps per round in synchronous decentralized protocols.
* ``channel`` — optional `fedsim.channel.Channel`: a stateful gossip step (compressed messages,
  CHOCO's public copies) that synchronous decentralized protocols run instead of ``merge``.
* ``client_state(params) -> dict`` — the initial persistent per-client state (None: stateless).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .state_types import checkpointable

Tensor = torch.Tensor
ClientState = Mapping[str, Tensor]


class Batch(NamedTuple):
    """One mini-batch: inputs, targets and a 0/1 mask (padding rows have mask 0)."""

    x: Tensor
    y: Tensor
    mask: Tensor


class Batches(NamedTuple):
    """The K mini-batches of one job, stacked: x ``[K, B, ...]``, y ``[K, B]``, mask ``[K, B]``."""

    x: Tensor
    y: Tensor
    mask: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, k: int) -> Batch:  # type: ignore[override]
        return Batch(self.x[k], self.y[k], self.mask[k])


GradFn = Callable[[Tensor, Batch], "tuple[Tensor, Tensor]"]  # (params, batch) -> (grad, loss)


@dataclass(frozen=True)
class LocalHP:
    """Local-training hyperparameters from the `local` config section."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


@checkpointable
@dataclass(frozen=True)
class Payload:
    """What a receiver publishes to its clients: the model and algorithm extras (c, g, lr…)."""

    params: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)


@checkpointable
class ClientOutput(NamedTuple):
    """Result of one local update: the uplink and the client's new persistent state."""

    update: Tensor  # pseudo-gradient x_start − y_end (or parameters, for gossip)
    state: dict[str, Tensor]  # new persistent client state ({} when stateless)
    extras: dict[str, Tensor]  # further uplink vectors, e.g. {"dc": Δc_i}
    metrics: dict[str, Tensor]  # scalars, e.g. {"train_loss": ...}


@dataclass(slots=True)  # built once per aggregated client: not frozen, which is ~1.5 µs cheaper
class Msg:
    """One contribution as a receiver sees it; the runtime fills every field."""

    sender: int
    update: Tensor
    weight: float  # aggregation coefficient chosen by the protocol's weighting rule
    staleness: int = 0  # server versions since the sender's model was published
    num_samples: int = 0
    num_steps: int = 0
    base: Tensor | None = None  # the model the sender started from
    extras: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CombineContext:
    """Read-only facts about the aggregation the runtime is performing."""

    num_clients: int  # population size N
    version: int  # server model version before this aggregation
    time: float  # virtual time (seconds)


LocalUpdate = Callable[[Payload, ClientState, Batches, GradFn, LocalHP], ClientOutput]


class Strategy(NamedTuple):
    """A federated or decentralized algorithm; see the module docstring for each field."""

    local: LocalUpdate
    init: Callable[[Tensor], Any] | None = None
    publish: Callable[[Any], Payload] | None = None
    combine: Callable[[Any, Sequence[Msg], CombineContext], Any] | None = None
    params: Callable[[Any], Tensor] | None = None
    client_state: Callable[[Tensor], dict[str, Tensor]] | None = None
    metrics: Callable[[Any], dict[str, float]] | None = None
    merge: Callable[[Tensor, Tensor, Tensor, Any], Tensor] | None = None
    gossip_steps: int = 1
    channel: Any = None  # fedsim.channel.Channel, or None: gossip sends the dense models

    @property
    def server_based(self) -> bool:
        """True when the strategy has a server part (runs under sync/async protocols)."""
        return self.combine is not None

    @property
    def decentralized(self) -> bool:
        """True when the strategy has a gossip merge rule (runs under gossip protocols)."""
        return self.merge is not None
