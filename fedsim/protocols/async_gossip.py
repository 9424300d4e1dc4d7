"""Asynchronous gossip learning on the virtual clock: each node trains, pushes, merges on its own.

Every node runs one job after another; a job (``local.steps`` batches, usually 1) lasts the
node's compute time from its system profile (times the per-job jitter), so nodes wake on
their own periods; the first job starts at a keyed random phase within one period. When a
job ends at time t the node

1. takes the trained model y as its own and pushes it to its out-neighbours: a copy reaches
   neighbour j at t + (upload of deg_i models on i's link) + (download of one on j's link);
2. if its buffer holds ≥ ``buffer_size`` received models (default: its in-degree), merges
   them with the strategy's rule, weights ``[α, (1−α)/m, …]`` (α = ``self_weight``) and
   empties the buffer ("train 50 / average 50" for α = ½);
3. starts its next job from the (merged) model.

A buffer keeps the newest model per sender. Arrivals at a tick are handled before the
jobs that end at that tick. With ``compression`` (`fedsim.channel`) a push sends one
compressed message under the feedback rule, receivers buffer the sender's view (CHOCO: its
public copy x̂_i), and a merge moves the node by x ← x + γ (merge(own view, views) − own view);
the identity compressor with γ = 1 is plain gossip (up to float rounding). A node's channel
state is kept in the run's per-node memory. A lost job (dropout) produces nothing; the node
starts over after the part of the job it spent. An unavailable node sleeps until
availability changes.
``rounds`` counts n completed jobs (one job per node on average, as one synchronous round);
``aggregations`` counts merges; ``bytes_up`` / ``bytes_down`` models sent / received.

The VCA authors' simulator (DFL2, Tian et al., arXiv 2404.04616) runs in discrete ticks:
in each tick the nodes due train one batch — instantly, from their model of that moment —
and push it; then every node whose buffer holds ≥ ``buffer_size`` models merges, whether
it trained in that tick or not. Its buffer counts every model received: a neighbour that
pushes twice before the merge fills two places, each averaged with weight 1/m. The rule
above differs in three ways: a job trains from the model the node had when the job
*started* (models arriving during it wait for the next one), a node merges only right
after its own job, and a second model from one sender replaces the first. ``rule: dfl2``
follows the authors instead: the node waits its compute time and then trains from its
current model (the trainings fall on the same instants as above), every received model
counts, and after all events of an instant each node whose buffer is full merges
(``merge`` events at the end of the instant). With ``compression`` such a merge takes the
node's own view as a node that did not just push: its public copy under ef21/econtrol,
else its model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import numpy as np
import torch

from .. import feedback as fb
from .. import rng
from ..rng import key
from ..clock import Event, EventQueue, later, tick_after, to_seconds
from ..comm import nbytes
from ..channel import build_channel
from ..config import Ge, OneOf, Range
from ..errors import ConfigError
from ..registry import PROTOCOLS
from ..state_types import checkpointable
from ..strategy import Payload, Tensor
from .base import Protocol, ProtocolState, RunContext
from .nodes import INITS, build_topology, check_init, check_simulated, eval_sample, initial_models, node_metrics

ARRIVE, TRAINED, WAKE, MERGE = 0, 1, 2, 3  # event priorities at equal times
OWN_JOB, DFL2 = "own_job", "dfl2"  # the `rule` knob


@checkpointable
@dataclass
class GossipState(ProtocolState):
    """Progress plus the node stack, the event queue and the receive buffers."""

    models: Tensor | None = None  # [n, d]
    queue: EventQueue = field(default_factory=EventQueue)
    # receiver -> sender -> model (rule 'dfl2': (sender, arrival number) -> model: every model counts)
    buffers: dict[int, dict[Any, Tensor]] = field(default_factory=dict)
    jobs_done: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


class AsyncGossipProtocol(Protocol):
    """See the module docstring."""

    strategy_kind = "gossip"

    def __init__(self, init: str, buffer_size: int | None, self_weight: float | None, eval_nodes: int,
                 compression: Any = None, rule: str = OWN_JOB):
        self.rule = rule
        self.init_mode = init
        self.buffer_size = buffer_size
        self.self_weight = self_weight
        self.eval_nodes = eval_nodes
        self.channel = build_channel("protocol.compression", compression)

    def setup(self, ctx: RunContext) -> None:
        check_simulated(ctx)
        check_init(ctx.task, self.init_mode)
        topo = build_topology(ctx)
        if not topo.static:
            raise ConfigError("topology.name", f"{topo.name!r} changes every round; the asynchronous gossip "
                              "protocol needs a static graph (use protocol 'decentralized' for schedules)")
        g = topo.graph()
        n = ctx.num_clients
        self.out = [topo.out_neighbors(i) for i in range(n)]
        indeg = [g.in_degree(i) if g.is_directed() else g.degree(i) for i in range(n)]
        self.needed = [self.buffer_size or max(1, d) for d in indeg]
        self._nodes = eval_sample(n, self.eval_nodes, ctx.seed)
        self._steps = ctx.config.local.steps or 1

    def init(self, ctx: RunContext) -> GossipState:
        state = GossipState(models=initial_models(ctx, self.init_mode))
        nodes = np.arange(ctx.num_clients)
        period = ctx.population.step_time(nodes) * self._steps
        phase = rng.uniform(ctx.seed, "gossip/phase", nodes) * period
        for i in nodes:
            at, residue = later(0, 0.0, phase[i])
            state.queue.push(at, "wake", WAKE, residue=residue, node=int(i))
        return state

    def resume(self, ctx: RunContext, state: GossipState) -> None:
        """Resubmits the jobs still training in a restored state (the executor knows none of
        them). A node's model does not change while its job runs, so the job is rebuilt exactly.
        With rule 'dfl2' a job is submitted when it trains: none is in flight."""
        training = [ev.data for ev in state.queue.pending("trained")] if self.rule == OWN_JOB else []
        for data in sorted(training, key=lambda d: d["job"]):
            i = data["node"]
            ctx.executor.submit(ctx.make_job(i, Payload(state.models[i].clone()), data["version"], data["job"]))

    def next_time(self, ctx: RunContext, state: GossipState) -> int | None:
        ev = state.queue.peek()
        return ev.time if ev is not None else None

    def step(self, ctx: RunContext, state: GossipState) -> GossipState:
        ev = state.queue.peek()
        budget = ctx.budget_ticks()
        if ev is None or ev.time > budget or ctx.out_of_rounds(state):
            if ev is not None and ev.time > budget:
                state.time, state.residue = int(budget), 0.0  # nothing happens before the budget ends: the state holds there
            state.finished = True
            return state
        ev = state.queue.pop()
        state.time, state.residue = ev.time, ev.residue
        if ev.kind == "arrive":
            self._receive(ctx, state, ev)
        elif ev.kind == "trained":
            self._finish(ctx, state, ev.data["node"], ev.data["job"])
        elif ev.kind == "wake":
            self._start(ctx, state, ev.data["node"])
        elif ev.kind == "merge":
            self._merge_buffer(ctx, state, ev.data["node"])
        state.finished = ctx.out_of_rounds(state)
        return state

    def _start(self, ctx: RunContext, state: GossipState, i: int) -> None:
        """Starts node i's next job now (or sleeps until it is available)."""
        t = state.time
        if len(ctx.population.available(np.array([i]), to_seconds(t))) == 0:
            nxt = ctx.population.next_availability_change(to_seconds(t))
            if math.isfinite(nxt):
                state.queue.push(tick_after(t, nxt), "wake", WAKE, residue=0.0, node=i)
            return
        job_id = state.next_job
        state.next_job += 1
        job = ctx.make_job(i, Payload(state.models[i].clone()), state.jobs_done, job_id)
        ids, jobs = np.array([i]), np.array([job_id])
        pop = ctx.population
        duration = float(pop.step_time(ids)[0] * job.num_steps * pop.jitter_factor(jobs)[0])  # compute only
        lost, lost_at = pop.drops(ids, jobs)
        if lost[0]:
            ctx.log(t, "lost", node=i, job=job_id)
            at, residue = later(t, state.residue, float(lost_at[0]) * duration)
            state.queue.push(at, "wake", WAKE, residue=residue, node=i)
            return
        if self.rule == OWN_JOB:  # with 'dfl2' the job is built and run when it trains, at its end
            ctx.executor.submit(job)
            ctx.log(t, "train", node=i, job=job_id)
        at, residue = later(t, state.residue, duration)
        state.queue.push(at, "trained", TRAINED, residue=residue, node=i, job=job_id, version=job.version)

    def _finish(self, ctx: RunContext, state: GossipState, i: int, job_id: int) -> None:
        """Node i's job ended: adopt, push, merge if the buffer is full (rule 'own_job'),
        start the next job."""
        t = state.time
        if self.rule == DFL2:  # trains now, from the node's current model
            ctx.log(t, "train", node=i, job=job_id)
            ctx.executor.submit(ctx.make_job(i, Payload(state.models[i].clone()), state.jobs_done, job_id))
        res, _ = ctx.receive(ctx.executor.result(job_id), state.rounds, t)
        ctx.accept(res)
        state.models[i] = res.updates[0]
        loss = res.metrics.get("train_loss")
        if loss is not None and not np.isnan(loss[0]):
            state.loss_sum, state.loss_count = state.loss_sum + float(loss[0]), state.loss_count + 1
        state.jobs_done += 1
        state.rounds = state.jobs_done // ctx.num_clients
        view = self._push(ctx, state, i, job_id)
        if self.rule == OWN_JOB:
            self._merge_buffer(ctx, state, i, view)
        self._start(ctx, state, i)

    def _receive(self, ctx: RunContext, state: GossipState, ev: Event) -> None:
        """A pushed model reaches its receiver's buffer (rule 'dfl2': and a merge is due at
        the end of the instant when the buffer has just become full)."""
        i, sender, model = ev.data["node"], ev.data["sender"], ev.data["model"]
        buffer = state.buffers.setdefault(i, {})
        buffer[sender if self.rule == OWN_JOB else (sender, ev.seq)] = model
        state.bytes_down += ev.data.get("size", nbytes(model))
        ctx.log(ev.time, "arrive", node=i, sender=sender)
        if self.rule == DFL2 and len(buffer) == self.needed[i]:
            state.queue.push(ev.time, "merge", MERGE, residue=ev.residue, node=i)

    def _merge_buffer(self, ctx: RunContext, state: GossipState, i: int, view: Tensor | None = None) -> None:
        """Merges node i's buffer into its model and empties it, if it holds enough models;
        `view` is what its neighbours took of its last push (None: it did not just push)."""
        buffer = state.buffers.get(i, {})
        if len(buffer) < self.needed[i]:
            return
        keys = sorted(buffer)  # by sender (then arrival)
        received = [buffer[k] for k in keys]
        if self.channel is None:
            state.models[i] = self._merge(ctx, state.models[i], received)
        else:
            own = view if view is not None else self._own_view(ctx, i, state.models[i])
            state.models[i] = self.channel.consensus(state.models[i], self._merge(ctx, own, received), own)
        state.buffers[i] = {}
        state.aggregations += 1
        ctx.log(state.time, "merge", node=i, senders=[k if self.rule == OWN_JOB else k[0] for k in keys])

    def _push(self, ctx: RunContext, state: GossipState, i: int, job_id: int) -> Tensor | None:
        """Sends node i's model (with compression: one message) to each out-neighbour, arriving
        after the link delays; returns what the receivers take of it (None: no neighbour)."""
        targets = self.out[i]
        if not targets:
            return None
        model = state.models[i].clone()
        size = nbytes(model)
        if self.channel is not None:
            own = ctx.memory.get(i) or self.channel.initial_state(model)
            own = {k: v.to(model.device) for k, v in own.items()}  # the store keeps memory on the CPU
            msg, kept, model = self.channel.send(model, own, key(ctx.seed, "gossip/channel", job_id))
            ctx.memory.put(i, kept)
            size = nbytes(msg)
        link = ctx.population.link
        up = float(link.transfer_time(np.array([i]), np.array([0]), np.array([size * len(targets)]))[0])
        down = link.transfer_time(np.array(targets), np.full(len(targets), size), np.zeros(len(targets)))
        for j, d in zip(targets, down):
            at, residue = later(state.time, state.residue, up + float(d))
            state.queue.push(at, "arrive", ARRIVE, residue=residue, node=j, sender=i, model=model, size=size)
        state.bytes_up += size * len(targets)
        ctx.log(state.time, "push", node=i, to=targets)
        return model

    def _own_view(self, ctx: RunContext, i: int, model: Tensor) -> Tensor:
        """What node i's neighbours know of it when it merges without having pushed: its public
        copy under ef21/econtrol, else its model."""
        if not self.channel.static_graph:
            return model
        kept = ctx.memory.get(i) or self.channel.initial_state(model)
        return kept[fb.ESTIMATE].to(model.device)

    def _merge(self, ctx: RunContext, own: Tensor, received: list[Tensor]) -> Tensor:
        """Returns own merged with the received models under the strategy's rule."""
        m = len(received)
        alpha = self.self_weight if self.self_weight is not None else 1.0 / (m + 1)
        weights = torch.tensor([[alpha] + [(1.0 - alpha) / m] * m], dtype=own.dtype, device=own.device)
        models = torch.stack([own, *received])
        return ctx.strategy.merge(models, weights, torch.zeros(1, dtype=torch.long, device=own.device),
                                  ctx.task.layout)[0]

    def eval_params(self, ctx: RunContext, state: GossipState) -> Tensor:
        return state.models.mean(0)

    def node_params(self, ctx: RunContext, state: GossipState) -> Tensor:
        return state.models

    def eval_metrics(self, ctx: RunContext, state: GossipState) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_loss": state.loss_sum / state.loss_count if state.loss_count else None,
            "jobs": state.jobs_done,
        }
        state.loss_sum, state.loss_count = 0.0, 0
        out.update(node_metrics(ctx, state.models, self._nodes))
        return out


@PROTOCOLS.register("async_gossip")
def async_gossip(
    init: Annotated[str, OneOf(INITS)] = "independent",
    buffer_size: Annotated[Optional[int], Ge(1)] = None,
    self_weight: Annotated[Optional[float], Range(0.0, 1.0)] = 0.5,
    eval_nodes: Annotated[int, Ge(0)] = 16,
    compression: Optional[dict] = None,
    rule: Annotated[str, OneOf((OWN_JOB, DFL2))] = OWN_JOB,
) -> Protocol:
    """Asynchronous gossip learning: nodes train on their own clocks, push, and merge full buffers.

    Args:
        init: 'independent' (each node from its own keyed initialisation, as in gossip
            learning) or 'shared' (every node from the same model).
        buffer_size: Received models that trigger a merge (default: the node's in-degree).
        self_weight: α, the weight of the node's own model in a merge (0.5 = "train 50 /
            average 50"); null gives every model in the merge the same weight.
        eval_nodes: Nodes whose own test accuracy is measured at each evaluation (a keyed
            sample when there are more; 0 turns per-node metrics off).
        compression: Compressed gossip messages, as for the decentralized protocol ({compressor,
            feedback, gamma, eta}; null: dense models).
        rule: When nodes train and merge. 'own_job': a job trains from the node's model at
            its start; the node merges right after its own job, over the newest model of
            each sender. 'dfl2' (the VCA authors' simulator): a node trains at the end of
            its compute time, from its model of that moment; every received model counts
            (one sender can fill several places); every node whose buffer is full merges
            at the end of the instant it filled.
    """
    return AsyncGossipProtocol(init, buffer_size, self_weight, eval_nodes, compression, rule)
