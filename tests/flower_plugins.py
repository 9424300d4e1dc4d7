"""Strategies for the Flower adapter tests, loaded as a plugin (``plugins: [<this file>]``).

* ``scaffold_probe``: SCAFFOLD, option II (Karimireddy et al., ICML 2020, arXiv 1910.06378):
  local steps along g − c_i + c; c_i⁺ = c_i − c + (x − y_K)/(K η); upload u = x − y_K and
  Δc_i = c_i⁺ − c_i; server x ← x − η_g Σ w_i u_i, c ← c + (1/N) Σ_{i∈S} Δc_i. The server's
  c travels as ``Payload.extras``, Δc_i as ``ClientOutput.extras``, c_i is client state.
* ``probe``: makes every applied update visible. Client i's state counts its accepted jobs
  k and its job uploads ``extras`` {count: k, version: the version it was sent}; the
  server's model counts applications per slot i·M + k — an update applied twice leaves a
  2, a state not kept leaves a 2 as well. ``combine`` checks version + staleness = the
  server version, and that each row's base is the model the client was sent.
* ``synthetic_on_nodes``: a data source that only a Flower node may build (the server of a
  run with ``evaluation = "federated"`` must not).
"""
from __future__ import annotations

import traceback
from typing import NamedTuple, Optional

import torch

from fedsim import vec
from fedsim.blocks import fl_server
from fedsim.local import sgd_steps
from fedsim.data.base import SourceData
from fedsim.data.sources import synthetic
from fedsim.registry import DATA_SOURCES, STRATEGIES
from fedsim.state_types import checkpointable
from fedsim.strategy import ClientOutput, Payload, ServerStrategy


@checkpointable
class ScaffoldState(NamedTuple):
    x: torch.Tensor
    c: torch.Tensor


@STRATEGIES.register("scaffold_probe")
def scaffold_probe(server_lr: float = 1.0) -> ServerStrategy:
    """SCAFFOLD option II (test copy, see the module docstring).

    Args:
        server_lr: Global learning rate η_g.
    """

    def local(payload, state, batches, grad_fn, hp):
        c, ci = payload.extras["c"], state["c"]

        def corrected(y, batch, grad_fn, k):
            g, loss = grad_fn(y, batch)
            return g - ci + c, loss

        y, loss = sgd_steps(payload.params, batches, grad_fn, hp, direction=corrected)
        ci_new = ci - c + (payload.params - y) / (batches.num_steps * hp.lr)
        return ClientOutput(payload.params - y, {"c": ci_new}, {"dc": ci_new - ci}, {"train_loss": loss})

    def combine(s, got, ctx):
        if not len(got):
            return s
        u = vec.weighted_sum(got.updates, got.weights.tolist())
        dc = vec.weighted_sum(got.extras["dc"], [1.0 / ctx.num_clients] * len(got))
        return ScaffoldState(s.x - server_lr * u, s.c + dc)

    return ServerStrategy(
        local=local,
        init=lambda x: ScaffoldState(x, torch.zeros_like(x)),
        publish=lambda s: Payload(s.x, {"c": s.c}),
        combine=combine,
        params=lambda s: s.x,
        client_state=lambda x: {"c": torch.zeros_like(x)},
    )


@checkpointable
class ProbeState(NamedTuple):
    counts: torch.Tensor
    version: int
    published: torch.Tensor  # the model of each version, to check the rows' bases: row v = version v


@STRATEGIES.register("probe")
def probe(slots: int = 16) -> ServerStrategy:
    """Counts applied updates per (client, job) slot (see the module docstring).

    Args:
        slots: Jobs per client that have a slot (M).
    """

    def local(payload, state, batches, grad_fn, hp):
        k = state["count"]
        extras = {"count": k.clone(), "version": payload.extras["version"]}
        return ClientOutput(torch.zeros_like(payload.params), {"count": k + 1}, extras, {"train_loss": torch.tensor(0.0)})

    def combine(s, got, ctx):
        if s.version != ctx.version:
            raise AssertionError(f"combine at server version {ctx.version}, strategy saw {s.version}")
        counts = s.counts.clone()
        for m in got.rows():
            sent = int(m.extras["version"])
            if sent + m.staleness != ctx.version:
                raise AssertionError(f"client {m.sender}: sent version {sent} + staleness {m.staleness} != {ctx.version}")
            if not torch.equal(m.base, s.published[sent]):
                raise AssertionError(f"client {m.sender}: its base is not the model of version {sent}")
            counts[m.sender * slots + int(m.extras["count"])] += 1
        return ProbeState(counts, s.version + 1, torch.cat([s.published, counts[None]]))

    return ServerStrategy(
        local=local,
        init=lambda x: ProbeState(torch.zeros_like(x), 0, torch.zeros_like(x)[None]),
        publish=lambda s: Payload(s.counts, {"version": torch.tensor(s.version)}),
        combine=combine,
        params=lambda s: s.counts,
        client_state=lambda x: {"count": torch.tensor(0)},
    )


@STRATEGIES.register("fails_on_client")
def fails_on_client() -> ServerStrategy:
    """A server part that averages, and a client part that raises (to test error reporting)."""

    def local(payload, state, batches, grad_fn, hp):
        raise RuntimeError("boom on the client")

    return fl_server(local)


@DATA_SOURCES.register("synthetic_on_nodes")
def synthetic_on_nodes(ctx, dim: int = 20, max_samples_per_user: Optional[int] = None) -> SourceData:
    """FedProx Synthetic (the built-in source, same data), built only on a Flower node: it
    raises when anything but a fedsim ClientApp builds it (the data is on the devices only).

    Args:
        dim: Feature dimension.
        max_samples_per_user: Cap on each user's samples.
    """
    frames = traceback.extract_stack()
    if not any(f.name == "node_run" and f.filename.endswith(("flower/client.py", "flower\\client.py")) for f in frames):
        raise RuntimeError("synthetic_on_nodes was built outside a Flower node")
    return synthetic(ctx, dim=dim, max_samples_per_user=max_samples_per_user)
