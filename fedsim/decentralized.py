"""Builds decentralized strategies: a local update that returns parameters, plus a merge rule.

Gossip messages carry parameters (not pseudo-gradients): a node's job returns its new model
y_K in ``ClientOutput.update``, and the protocol merges the nodes' models with the
strategy's rule (`fedsim.merge`); how often and over which messages is the protocol's business.
"""
from __future__ import annotations

from dataclasses import replace

from .local import Direction, gradient, local_lr, sgd_steps
from .merge import mix
from .strategy import Batches, ClientOutput, ClientState, GossipStrategy, GradFn, LocalHP, LocalUpdate, Payload


def train_params(direction: Direction = gradient, momentum: float | None = None) -> LocalUpdate:
    """Returns a node's local update: K SGD steps along `direction` from its model; uploads y_K.

    `momentum`, when given, replaces ``local.momentum`` (the buffer restarts every job).
    """

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        hp = hp if momentum is None else replace(hp, momentum=momentum)
        y, loss = sgd_steps(payload.params, batches, grad_fn, hp, direction, lr=local_lr(payload, hp))
        return ClientOutput(y, {}, {}, {"train_loss": loss})

    return local


def decentralized(local: LocalUpdate, merge=mix) -> GossipStrategy:
    """Returns a decentralized strategy: `local` on every node, then the protocol's merges with `merge`."""
    return GossipStrategy(local=local, merge=merge)
