"""Per-client evaluation: each client's accuracy on its own test data, summarised per row.

A client's own test data is what `data.client_test_fraction` held out of its samples, or the
source's per-user test set (LEAF). Server-based protocols: the global model on every
client's test data; gossip protocols: each node's own model on that node's test data. An
evaluation row then gets ``client_acc_mean``, ``client_acc_std`` (population standard
deviation), ``client_acc_p10`` (10th percentile, linear interpolation) and
``client_acc_min`` over the clients that have test data — the fairness figures FL papers
report. Classification tasks only (accuracy is argmax = label).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data.base import FederatedData
from .task import Task


def summarise(accuracies: np.ndarray) -> dict[str, float]:
    """Returns the row columns for per-client accuracies (mean, std, 10th percentile, min)."""
    return {
        "client_acc_mean": float(np.mean(accuracies)),
        "client_acc_std": float(np.std(accuracies)),
        "client_acc_p10": float(np.percentile(accuracies, 10)),
        "client_acc_min": float(np.min(accuracies)),
    }


class ClientEvaluation:
    """The clients' test sets concatenated once; accuracies of one model or one model per client."""

    def __init__(self, data: FederatedData):
        self.clients = np.array([i for i in range(data.num_clients) if len(data.client_test[i])], dtype=np.int64)
        parts = [data.client_test_data(int(i)) for i in self.clients]
        self.x = torch.cat([p[0] for p in parts])
        self.y = torch.cat([p[1] for p in parts])
        self.sizes = np.array([len(p[1]) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    @classmethod
    def of(cls, data: FederatedData, task: Task) -> "ClientEvaluation | None":
        """Returns the evaluation for `data`, or None when no client has test data of its own
        or the task has no accuracy."""
        if task.kind != "classification" or not data.has_client_tests:
            return None
        return cls(data)

    @torch.no_grad()
    def _correct(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        """Returns a bool per sample of (x, y): whether `params` predicts its label."""
        params = params.detach().to(x.device)
        out = [task.forward(params, x[s : s + batch_size]).argmax(-1) == y[s : s + batch_size]
               for s in range(0, len(y), batch_size)]
        return torch.cat(out)

    def accuracies(self, task: Task, params: Tensor, batch_size: int) -> np.ndarray:
        """Returns each client's accuracy of the one model `params` on its own test data."""
        correct = self._correct(task, params, self.x, self.y, batch_size).to(torch.float64).cpu().numpy()
        return np.add.reduceat(correct, self.offsets[:-1]) / self.sizes

    def node_accuracies(self, task: Task, models: Tensor, batch_size: int) -> np.ndarray:
        """Returns each client's accuracy of its own model (row of `models`) on its own test data."""
        acc = np.empty(len(self.clients))
        for k, client in enumerate(self.clients):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            acc[k] = float(self._correct(task, models[client], self.x[lo:hi], self.y[lo:hi], batch_size)
                           .to(torch.float64).mean())
        return acc

    def row(self, task: Task, params: Tensor, models: Tensor | None, batch_size: int) -> dict[str, Any]:
        """Returns the per-client columns: node models on their own data when `models` is
        given (gossip), else the global model `params` on every client's data."""
        was_training = task.module.training
        task.module.eval()
        try:
            if models is not None:
                return summarise(self.node_accuracies(task, models, batch_size))
            return summarise(self.accuracies(task, params, batch_size))
        finally:
            task.module.train(was_training)


__all__ = ["ClientEvaluation", "summarise"]
