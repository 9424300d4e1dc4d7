"""Workload W, the benchmarks' small anchor workload (benchmarks/README.md), as a fedsim config.

100 clients × 64 samples of a 60-feature Gaussian mixture (10 classes, Dirichlet(0.5)
label proportions per client), MLP 60-200-10, one local epoch of batch 16 (4 SGD steps,
lr 0.05), FedAvg over all clients.
"""
from __future__ import annotations

from typing import Any


def workload_w(rounds: int = 20, executor: str = "serial", **executor_kwargs: Any) -> dict[str, Any]:
    """Returns the workload-W config mapping (serial executor unless told otherwise)."""
    return {
        "name": "workload-w",
        "seed": 0,
        "data": {
            "name": "gaussian_mixture",
            "num_samples": 8000,
            "dim": 60,
            "num_classes": 10,
            "test_fraction": 0.2,
            "num_clients": 100,
            "partition": {"name": "dirichlet_per_client", "alpha": 0.5},
        },
        "model": {"name": "mlp", "hidden": [200]},
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.05, "batch_size": 16, "epochs": 1},
        "protocol": {"name": "sync"},
        "executor": {"kind": executor, **executor_kwargs},
        "run": {"rounds": rounds, "eval_every": rounds, "progress": False},
    }
