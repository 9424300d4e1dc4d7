"""Hand-made federated quadratics for strategy-level tests that skip the engine (fast)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedsim.contributions import contributions
from fedsim.strategy import Batch, Batches, CombineContext, LocalHP


def quad_grad(a: float, b) -> object:
    """Returns the gradient function of ½ a ‖x − b‖² (a client whose optimum is b)."""
    bt = torch.as_tensor(b, dtype=torch.float64)

    def grad_fn(x: torch.Tensor, batch: Batch):
        return a * (x - bt), 0.5 * a * ((x - bt) ** 2).sum()

    return grad_fn


def steps(k: int) -> Batches:
    """Returns K dummy one-sample batches (the gradient functions above ignore them)."""
    z = torch.zeros(k, 1, 1, dtype=torch.float64)
    return Batches(z, torch.zeros(k, 1, dtype=torch.float64), torch.ones(k, 1, dtype=torch.float64))


def quadratic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns curvatures a_i ~ U[0.5, 5], optima b_i ~ N(0, 9 I) and the optimum Σ a_i b_i / Σ a_i."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 5.0, n), rng.normal(0.0, 3.0, (n, d))
    return a, b, (a[:, None] * b).sum(0) / a.sum()


def one_round(s, state, clients: Sequence[tuple], weights: Sequence[float], hp: LocalHP = LocalHP(lr=0.1),
              client_states: list | None = None, round_: int = 0, memory: dict | None = None):
    """Runs every (grad_fn, K) client from the published model, then the strategy's `receive`
    step (with the senders' memory: `memory`, client -> its entry, updated in place) and
    combine, as a protocol does; returns the new server state (client states, when given, are
    read and replaced in place)."""
    payload = s.publish(state)
    ups, extras, ks = [], [], []
    for i, ((grad, k), w) in enumerate(zip(clients, weights)):
        torch.default_generator.manual_seed(1000 * round_ + i)  # as the executor seeds each job
        own = client_states[i] if client_states is not None else {}
        out = s.local(payload, own, steps(k), grad, hp)
        if client_states is not None:
            client_states[i] = out.state
        ups.append(out.update)
        extras.append(out.extras)
        ks.append(k)
    msgs = contributions(ups, weights, num_steps=ks, extras={k: [e[k] for e in extras] for k in extras[0]})
    if getattr(s, "receive", None) is not None:
        memory = {} if memory is None else memory
        rows = [memory.get(i) or s.sender_memory(payload.params) for i in range(len(ups))] if s.sender_memory else []
        msgs, new = s.receive(msgs, {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {})
        for k, v in new.items():
            for i in range(len(ups)):
                memory.setdefault(i, {})[k] = v[i]
    return s.combine(state, msgs, CombineContext(len(clients), round_, 0.0))
