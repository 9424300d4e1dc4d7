"""The strategy contract: two kinds of strategies, each pure functions plus explicit state.

Sign convention (fixed everywhere): an FL client's update is a pseudo-gradient
``u = x_start − y_end`` — the model it received minus the model it ended with. A server
applies ``x ← x − η_g · aggregate(u)``. Gossip merges work on parameters.

Both kinds share the client part, ``local(payload, state, batches, grad_fn, hp) ->
ClientOutput``: pure over tensors; it gets a gradient function from the engine and never sees
an nn.Module, so the same code runs client by client, in Ray actors, under
``torch.func.vmap`` and on a Flower SuperNode. ``client_state(params)`` gives a client's
initial persistent state (None: stateless); the runtime keeps it per client
(`fedsim.state_store`) and writes it back only when the client's result is accepted.

* `ServerStrategy` — a server folds clients' contributions into its own state (sync and
  async protocols): ``init(params) -> S``, ``publish(S) -> Payload``,
  ``combine(S, contributions, ctx) -> S``, ``params(S) -> x``. The protocol decides *when*
  combine runs and fills each row's weight, staleness and base (`fedsim.contributions`).
  Optionally ``receive(contributions, memory) -> (contributions, new memory)`` turns the
  raw contributions into what combine reads before every aggregation (decoding compressed
  messages), given the server's memory of each row's sender (rows ``[m, ...]``, as before
  this aggregation; a sender may have several rows) and returning its new memory rows, which
  the runtime keeps per sender in the client-state store once the rows are aggregated (the
  last row of a sender wins); ``sender_memory(params)`` gives a sender's initial memory.
* `GossipStrategy` — every node holds a model and merges it with its neighbours' (the
  decentralized protocols): ``merge(models, weights, own, layout) -> params``, pure over
  stacks: ``models [m, d]`` are every model involved, ``weights [k, m]`` (dense or sparse)
  give receiver r's weight on each of them in row r, ``own [k]`` is the index of receiver r's
  own model in `models`, ``layout`` cuts a row into the model's tensors. A node's ``local``
  returns its new *parameters* in ``ClientOutput.update``. How often nodes gossip and
  whether messages are compressed are protocol settings, not the strategy's.

``protocols`` (None: every protocol of the strategy's kind) restricts a strategy to the
protocols it was designed for (FedAsync: one arrival at a time).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Union

import torch

from .state_types import checkpointable
if TYPE_CHECKING:
    from .contributions import Contributions

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


JOB_HP_PREFIX = "hp."  # a job's own settings travel as payload extras under this prefix
JOB_HP_FIELDS = ("lr", "momentum", "weight_decay")
CAPTURED_PREFIX = "hp.captured."  # values for a shared local update's captured floats (`fedsim.closures.lift`)


def split_job_hp(hp: LocalHP, extras: Mapping[str, Any]) -> "tuple[LocalHP, Mapping[str, Any]]":
    """Returns (the hyperparameters a job runs with, its payload extras without them).

    A job may carry its own ``lr``, ``momentum`` or ``weight_decay`` as the extras ``hp.lr``,
    ``hp.momentum``, ``hp.weight_decay`` (0-d tensors; under vmap, one per client): a
    vectorised sweep over these settings puts them there, and every executor reads them
    here, so a strategy's ``local`` sees them as ``hp`` fields and never as extras. Extras
    ``hp.captured.N`` stay: the vectorised sweep's own wrapper of ``local`` takes them."""
    if not any(k.startswith(JOB_HP_PREFIX) for k in extras):
        return hp, extras
    own = {k[len(JOB_HP_PREFIX):]: v for k, v in extras.items()
           if k.startswith(JOB_HP_PREFIX) and not k.startswith(CAPTURED_PREFIX)}
    unknown = sorted(set(own) - set(JOB_HP_FIELDS))
    if unknown:
        raise ValueError(f"unknown job hyperparameter extra(s) {', '.join(JOB_HP_PREFIX + k for k in unknown)}")
    rest = {k: v for k, v in extras.items() if not k.startswith(JOB_HP_PREFIX) or k.startswith(CAPTURED_PREFIX)}
    return replace(hp, **own), rest


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


@dataclass(frozen=True)
class CombineContext:
    """Read-only facts about the aggregation the runtime is performing."""

    num_clients: int  # population size N
    version: int  # server model version before this aggregation
    time: float  # virtual time (seconds)


@dataclass(frozen=True)
class StrategyContext:
    """What the engine tells a strategy factory that declares a leading ``ctx`` parameter
    (e.g. the ``dp`` wrapper, to calibrate its noise): facts of the run it will drive. A
    factory built without it (on a worker, in a test) gets None."""

    num_clients: int  # population size N
    seed: int  # the run's seed: key the strategy's own draws by it
    rounds: int | None  # run.rounds (None: the run stops by time budget only)
    cohort: int | None  # clients sampled per aggregation (sync), else None
    sampling_problem: str | None  # why aggregations are not uniformly sampled cohorts (None: they are)


LocalUpdate = Callable[[Payload, ClientState, Batches, GradFn, LocalHP], ClientOutput]


Merge = Callable[[Tensor, Tensor, Tensor, Any], Tensor]  # (models, weights, own, layout) -> merged


class ServerStrategy(NamedTuple):
    """A server-based algorithm (sync and async protocols); see the module docstring."""

    local: LocalUpdate
    init: Callable[[Tensor], Any]
    publish: Callable[[Any], Payload]
    combine: Callable[[Any, "Contributions", CombineContext], Any]
    params: Callable[[Any], Tensor]
    client_state: Callable[[Tensor], dict[str, Tensor]] | None = None
    metrics: Callable[[Any], dict[str, float]] | None = None
    receive: Callable[["Contributions", Mapping[str, Tensor]], "tuple[Contributions, dict[str, Tensor]]"] | None = None
    sender_memory: Callable[[Tensor], dict[str, Tensor]] | None = None
    protocols: tuple[str, ...] | None = None


class GossipStrategy(NamedTuple):
    """A decentralized algorithm (the gossip protocols); see the module docstring."""

    local: LocalUpdate
    merge: Merge
    client_state: Callable[[Tensor], dict[str, Tensor]] | None = None
    protocols: tuple[str, ...] | None = None


Strategy = Union[ServerStrategy, GossipStrategy]
STRATEGY_KINDS = {"server": ServerStrategy, "gossip": GossipStrategy}
STRATEGY_TYPES = (ServerStrategy, GossipStrategy)  # what a strategy factory must return


def kind_of(strategy: Any) -> str:
    """Returns 'server' or 'gossip' for a strategy; raises TypeError for anything else."""
    for name, cls in STRATEGY_KINDS.items():
        if isinstance(strategy, cls):
            return name
    raise TypeError(f"a strategy factory must return a ServerStrategy or a GossipStrategy, not {type(strategy).__name__}")
