"""Synchronous decentralized rounds: every node trains, then Q Jacobi gossip steps on the stack.

Round r starts at virtual time t_r. Every available node i whose job is not lost runs one
local job (K steps, via the executor) from its model x_i, giving y_i; then the nodes merge
Q = ``gossip_steps`` times with the round's mixing matrix W_r (all nodes use the
previous step's models: ``Y ← merge(Y, W_r)``, a matmul for plain mixing; W_r is dense up
to 256 nodes and a sparse CSR tensor beyond, on the device of the node stack — the GPU
with the vmap executor's ``keep_on_device``, where the nodes' local steps run as one
vmapped call). Nodes that are unavailable or lost neither train nor gossip this round:
their links are dropped and their weight moved to the diagonal, which keeps W symmetric
and doubly stochastic. Node i's part
of the round lasts its compute time plus the transfer of Q·deg_i models each way; the
round ends when the slowest node is done. A round that would end after run.time_budget is
not performed (the round is planned before it is applied, `rounds.RoundProtocol`, so
time-based evaluation sees its end). Bytes: ``bytes_up`` counts models sent, ``bytes_down``
models received — or, with ``compression`` (a `fedsim.channel.Channel`: compressed gossip,
CHOCO), the encoded messages of its gossip steps, which then run in the plan (their sizes
time the round); each node's channel state is kept in the run's per-node memory
(`RunContext.memory`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional

import numpy as np
import torch

from fedsim.topologies.mixing import as_tensor, message_counts, restrict, spectral_gap

from ..channel import build_channel, link_bytes
from ..clock import later, to_seconds
from ..comm import nbytes
from ..config import Ge, OneOf
from ..errors import ConfigError
from ..contributions import Contributions
from ..executors.job_batch import PayloadRows
from ..registry import PROTOCOLS
from ..rng import key
from ..state_types import checkpointable
from ..strategy import Tensor
from ..vec import stack_on
from .base import Protocol, ProtocolState, RunContext, wait_for_availability
from .nodes import INITS, build_topology, check_init, check_simulated, eval_sample, initial_models, node_metrics
from .rounds import FINISH, WAIT, RoundProtocol

MAX_GAP_NODES = 1024  # the spectral gap (a dense SVD) is reported up to this many nodes


@checkpointable
@dataclass
class DecentralizedState(ProtocolState):
    """Progress plus the node stack and the last round's statistics."""

    models: Tensor | None = None  # [n, d]: node i's model in row i
    train_loss: float | None = None
    active: int = 0  # nodes that trained and gossiped in the last round
    spectral_gap: float | None = None  # of the last round's mixing matrix


@dataclass
class GossipRound:
    """A planned round: the nodes that trained, their results, the round's W and message counts."""

    ids: np.ndarray  # nodes that train and gossip
    results: Contributions  # their jobs' results (the new models), in `ids` order
    w: Any  # the round's mixing matrix, restricted to the active nodes
    everyone: bool  # every node active
    recv: np.ndarray  # models each node receives per gossip step
    sent: np.ndarray  # models each node sends per gossip step
    end: int
    end_residue: float  # exact end − end, in ticks
    bytes_down: np.ndarray  # bytes each node receives in the round's Q gossip steps
    bytes_up: np.ndarray  # bytes each node sends in them
    gossiped: tuple[Tensor, dict[int, dict[str, Tensor]]] | None = None  # with a channel: new stack, changed node states


class DecentralizedProtocol(RoundProtocol):
    """See the module docstring."""

    strategy_kind = "gossip"

    def __init__(self, init: str, eval_nodes: int, gossip_steps: int = 1, compression: Any = None):
        self.init_mode = init
        self.eval_nodes = eval_nodes
        self.gossip_steps = gossip_steps
        self.channel = build_channel("protocol.compression", compression)

    def setup(self, ctx: RunContext) -> None:
        check_simulated(ctx)
        check_init(ctx.task, self.init_mode)
        self.topology = build_topology(ctx)
        channel = self.channel
        if channel is not None and channel.static_graph and not self.topology.static:
            raise ConfigError("topology.name", f"{self.topology.name!r} changes every round; compressed gossip "
                              "with public copies (feedback ef21/econtrol) keeps state per neighbour and needs a static graph")
        small = ctx.num_clients <= MAX_GAP_NODES
        self._static_gap = spectral_gap(self.topology.mixing(0)) if self.topology.static and small else None
        self._nodes = eval_sample(ctx.num_clients, self.eval_nodes, ctx.seed)
        self._static_w: Tensor | None = None

    def init(self, ctx: RunContext) -> DecentralizedState:
        return DecentralizedState(models=initial_models(ctx, self.init_mode))

    def plan(self, ctx: RunContext, state: DecentralizedState) -> GossipRound | str:
        """Runs the round's jobs and times the round; returns it, or 'finish' (out of rounds,
        or it would end after the budget) or 'wait' (no node available)."""
        if ctx.out_of_rounds(state):
            return FINISH
        n, t0, r = ctx.num_clients, state.time, state.rounds
        nodes = np.arange(n)
        job_ids = state.next_job + nodes
        active = np.zeros(n, dtype=bool)
        active[ctx.population.available(nodes, to_seconds(t0))] = True
        if not active.any():
            return WAIT
        active &= ~ctx.population.drops(nodes, job_ids)[0]
        ids = nodes[active]

        x = state.models  # never written in place (y below is a new tensor): the payloads are its rows
        rows = x if len(ids) == n else x[torch.from_numpy(ids).to(x.device)]
        jobs = ctx.make_jobs(ids, PayloadRows(rows), r, job_ids[ids])
        results = ctx.executor.run(jobs)
        w = self.topology.mixing(r)
        w = w if active.all() else restrict(w, active)
        recv, sent = message_counts(w)
        q, size, gossiped = self.gossip_steps, nbytes(x[0]), None
        down, up = q * size * recv, q * size * sent
        if self.channel is not None:
            gossiped, down, up = self._channel_gossip(ctx, state, ids, results, w, bool(active.all()))
        durations = ctx.population.job_seconds(ids, jobs.num_steps, down[ids], up[ids], job_ids[ids])
        end, residue = later(t0, state.residue, durations.max(initial=0.0))  # the slowest node's end
        if end > ctx.budget_ticks():
            return FINISH
        return GossipRound(ids, results, w, bool(active.all()), recv, sent, end, residue, down, up, gossiped)

    def plan_end(self, plan: GossipRound | str) -> int | None:
        return plan.end if isinstance(plan, GossipRound) else None

    def apply(self, ctx: RunContext, state: DecentralizedState, plan: GossipRound | str) -> DecentralizedState:
        if plan == FINISH:
            state.finished = True
            return state
        if plan == WAIT:
            return wait_for_availability(ctx, state)
        n, t0, r, end, ids = ctx.num_clients, state.time, state.rounds, plan.end, plan.ids
        q = self.gossip_steps
        results, _ = ctx.receive(plan.results, r, t0)  # the NaN/inf check (a channel's plan gossiped unchecked)
        ctx.accept(results)
        if plan.gossiped is not None:
            y, changed = plan.gossiped
            for node, st in changed.items():
                ctx.memory.put(node, st)
        else:
            y = state.models.clone()
            if len(results):
                y[torch.as_tensor(ids, device=y.device)] = results.updates
            wt = self._mixing_tensor(plan.w, plan.everyone, y)
            own = torch.arange(n, device=y.device)
            for _ in range(q):
                y = ctx.strategy.merge(y, wt, own, ctx.task.layout)

        if ctx.events is not None:
            ctx.log(t0, "train", round=r, nodes=ids.tolist())
            ctx.log(end, "gossip", round=r, steps=q, messages=int(q * plan.sent.sum()))
        state.models = y
        state.train_loss = results.metric_means().get("train_loss")
        state.active = len(ids)
        state.spectral_gap = self._spectral_gap(plan.w, plan.everyone)
        state.bytes_up += int(plan.bytes_up.sum())
        state.bytes_down += int(plan.bytes_down.sum())
        state.next_job += n
        state.rounds += 1
        state.aggregations += q
        state.time, state.residue = end, plan.end_residue
        state.finished = ctx.out_of_rounds(state)
        return state

    def _channel_gossip(self, ctx: RunContext, state: DecentralizedState, ids: np.ndarray, results: Contributions,
                        w: Any, everyone: bool) -> tuple[tuple[Tensor, dict], np.ndarray, np.ndarray]:
        """Runs the round's Q steps of the compressed channel on the trained stack, without
        changing `state` or the nodes' memory; returns ((new stack, {node: new channel state}
        of the nodes that sent), bytes each node received, bytes each sent)."""
        y = state.models.clone()
        if len(results):
            y[torch.as_tensor(ids, device=y.device)] = results.updates
        wt, channel = self._mixing_tensor(w, everyone, y), self.channel
        rows = [ctx.memory.get(i) or channel.initial_state(y[i]) for i in range(len(y))]
        cstate = {k: stack_on([r[k] for r in rows], y.device) for k in rows[0]}  # stored (CPU) and fresh rows
        senders, r = message_counts(w)[1] > 0, state.rounds
        down, up = np.zeros(len(y), dtype=np.int64), np.zeros(len(y), dtype=np.int64)
        for s in range(self.gossip_steps):
            y, cstate, sizes = channel.step(y, wt, cstate, senders, key(ctx.seed, "gossip/channel", r, s),
                                            ctx.task.layout, ctx.strategy.merge)
            d, u = link_bytes(w, sizes)
            down, up = down + d, up + u
        changed = {int(i): {k: v[i] for k, v in cstate.items()} for i in np.flatnonzero(senders)} if cstate else {}
        return (y, changed), down, up

    def _mixing_tensor(self, w: Any, everyone: bool, like: Tensor) -> Tensor:
        """Returns W as a tensor on the stack's device (dense up to 256 nodes, sparse CSR beyond);
        for a static graph with every node taking part, built once and reused."""
        if not (everyone and self.topology.static):
            return as_tensor(w, like.dtype, like.device)
        if self._static_w is None or self._static_w.dtype != like.dtype or self._static_w.device != like.device:
            self._static_w = as_tensor(w, like.dtype, like.device)
        return self._static_w

    def _spectral_gap(self, w: Any, everyone: bool) -> float | None:
        """Returns 1 − λ of this round's W (once for a static graph; None beyond 1024 nodes)."""
        if everyone and self.topology.static:
            return self._static_gap
        return spectral_gap(w) if w.shape[0] <= MAX_GAP_NODES else None

    def eval_params(self, ctx: RunContext, state: DecentralizedState) -> Tensor:
        return state.models.mean(0)

    def node_params(self, ctx: RunContext, state: DecentralizedState) -> Tensor:
        return state.models

    def eval_metrics(self, ctx: RunContext, state: DecentralizedState) -> dict[str, Any]:
        out: dict[str, Any] = {"train_loss": state.train_loss, "active_nodes": state.active,
                               "spectral_gap": state.spectral_gap}
        out.update(node_metrics(ctx, state.models, self._nodes))
        return out


@PROTOCOLS.register("decentralized")
def decentralized(
    init: Annotated[str, OneOf(INITS)] = "shared",
    eval_nodes: Annotated[int, Ge(0)] = 16,
    gossip_steps: Annotated[int, Ge(1)] = 1,
    compression: Optional[dict] = None,
) -> Protocol:
    """Synchronous decentralized learning: all nodes train, then gossip Q times over the topology.

    Args:
        init: 'shared' (every node starts from the same model) or 'independent' (each node
            from its own keyed initialisation).
        eval_nodes: Nodes whose own test accuracy is measured at each evaluation (a keyed
            sample when there are more; 0 turns per-node metrics off).
        gossip_steps: Gossip steps Q per round (1: DFedAvg, DFedSAM; Q > 1: multiple gossip
            steps, e.g. DFedSAM-MGS with Q = 4).
        compression: Compressed gossip messages (CHOCO-SGD with feedback ef21): {compressor:
            topk {ratio} | randk | sign | qsgd {bits, bucket, contractive} | identity, feedback:
            ef21 (CHOCO, default) | none | ef (DeepSqueeze) | econtrol, gamma: the consensus step
            γ ∈ (0, 1] (required; Top-1% on a ring of 20: 0.05), eta: EControl's η (0.1)};
            null: dense models.
    """
    return DecentralizedProtocol(init, eval_nodes, gossip_steps, compression)
