"""What the decentralized protocols share: the topology, the node stack, the metrics.

Every node's model is one row of a plain ``[n, d]`` tensor (the "stack"): gossip is a
matmul on it, and executors that shard or vectorise nodes get it as it is. The stack lives
where the executor keeps models (``Executor.model_device``: the GPU for the vmap executor
with ``keep_on_device``), so training, gossip and the metrics below never leave that device.

Metrics of an evaluation row (beside the runner's accuracy of the nodes' *average* model):
``node_acc_mean / _std / _min / _max`` over a keyed sample of `eval_nodes` nodes (all nodes
when n is small; ``node_loss_*`` for tasks without accuracy), ``consensus_distance``
(mean_i ‖x_i − x̄‖₂) and ``spectral_gap`` of the mixing matrix in use.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..rng import key, keyed_torch, numpy_rng
from ..task import Task
from .base import RunContext

INITS = ("shared", "independent")


def build_topology(ctx: RunContext):
    """Returns the run's `topologies.base.Topology` (the default ring when `topology` is unset)."""
    from fedsim.topologies.base import build_topology as build

    return build(ctx.config.topology, ctx.num_clients, ctx.seed)


def check_simulated(ctx: RunContext) -> None:
    """Raises ConfigError unless the run is simulated: the decentralized protocols take their
    timing and topology from the population models (no deployment transport exists for them)."""
    if not ctx.clock.virtual:
        raise ConfigError("protocol.name", f"protocol {ctx.config.protocol.name!r} runs in simulation only")


def check_init(task: Task, init: str) -> None:
    """Raises ConfigError (at set-up, before any output is written) if `init` cannot be done
    for this model: 'independent' needs layers with ``reset_parameters()``."""
    if init == "independent" and not any(hasattr(m, "reset_parameters") for m in task.module.modules()):
        raise ConfigError("protocol.init", "the model has no layer with reset_parameters(); use init: shared")


def independent_params(task: Task, seed: int, nodes: int) -> torch.Tensor:
    """Returns ``[nodes, d]`` fresh initialisations, node i's drawn from key(seed, 'init/node', i)
    by calling every layer's ``reset_parameters()`` (PyTorch's default initialisers)."""
    check_init(task, "independent")
    module = copy.deepcopy(task.module)
    layers = [m for m in module.modules() if hasattr(m, "reset_parameters")]
    rows = []
    for i in range(nodes):
        with keyed_torch(key(seed, "init/node", i)):
            for layer in layers:
                layer.reset_parameters()
        rows.append(task.flatten_module(module))
    return torch.stack(rows)


def initial_models(ctx: RunContext, init: str) -> torch.Tensor:
    """Returns the initial node stack: every node at the run's model ('shared'), or each node
    at its own keyed initialisation ('independent')."""
    if init == "independent":  # drawn on the CPU (the same draws everywhere), then moved
        return independent_params(ctx.task, ctx.seed, ctx.num_clients).to(ctx.initial_params.device)
    return ctx.initial_params.unsqueeze(0).repeat(ctx.num_clients, 1)


def eval_sample(num_nodes: int, size: int, seed: int) -> np.ndarray:
    """Returns the sorted nodes whose own accuracy is measured: all, or a keyed sample of `size`."""
    if size >= num_nodes:
        return np.arange(num_nodes)
    return np.sort(numpy_rng(seed, "eval_nodes").choice(num_nodes, size, replace=False))


def consensus_distance(models: torch.Tensor) -> float:
    """Returns mean_i ‖x_i − x̄‖₂, the nodes' mean distance to their average model."""
    return float(torch.linalg.vector_norm(models - models.mean(0), dim=1).mean())


def node_metrics(ctx: RunContext, models: torch.Tensor, nodes: np.ndarray) -> dict[str, Any]:
    """Returns the per-node accuracy statistics over `nodes` and the consensus distance."""
    out: dict[str, Any] = {"consensus_distance": consensus_distance(models)}
    if len(nodes) == 0:
        return out
    src = ctx.data.source
    evaluate = ctx.executor.evaluate  # on the executor's device, where the stack lives
    evals = [evaluate(ctx.task, models[i], src.x_test, src.y_test, ctx.run.eval_batch_size) for i in nodes]
    name, values = ("acc", [e["accuracy"] for e in evals]) if evals[0]["accuracy"] is not None else \
        ("loss", [e["loss"] for e in evals])
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run says so in its error, not in warnings
        out.update({f"node_{name}_mean": float(v.mean()), f"node_{name}_std": float(v.std()),
                    f"node_{name}_min": float(v.min()), f"node_{name}_max": float(v.max())})
    return out
