"""Per-client evaluation: each client's accuracy on its own test data, summarised per row.

A client's own test data is what `data.client_test_fraction` held out of its samples, or the
source's per-user test set (LEAF). Server-based protocols: the global model on every
client's test data; gossip protocols: each node's own model on that node's test data. An
evaluation row then gets ``client_acc_mean``, ``client_acc_std`` (population standard
deviation), ``client_acc_p10`` (10th percentile, linear interpolation) and
``client_acc_min`` over the clients that have test data — the fairness figures FL papers
report. Classification tasks only (accuracy is argmax = label).

Personalisation (`data.client_finetune_steps` = k > 0): the same model is also fine-tuned
by each client alone — k plain SGD steps (no momentum, no augmentation) at
`data.client_finetune_lr` on mini-batches of `local.batch_size` from its own training
samples, drawn keyed by (seed, client, evaluation time) — and evaluated on its test data:
columns ``client_acc_ft_mean``, ``client_acc_ft_std``, ``client_acc_ft_p10``,
``client_acc_ft_min``. The fine-tuned models are thrown away; training is not affected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data.base import FederatedData
from .data.batching import gather_batches, job_indices
from .errors import ConfigError
from .rng import numpy_rng
from .task import Task


def summarise(accuracies: np.ndarray, prefix: str = "client_acc") -> dict[str, float]:
    """Returns the row columns for per-client accuracies (mean, std, 10th percentile, min)."""
    return {
        f"{prefix}_mean": float(np.mean(accuracies)),
        f"{prefix}_std": float(np.std(accuracies)),
        f"{prefix}_p10": float(np.percentile(accuracies, 10)),
        f"{prefix}_min": float(np.min(accuracies)),
    }


@dataclass(frozen=True)
class FineTune:
    """Per-client fine-tuning before the personalised evaluation: `steps` SGD steps at `lr`
    on mini-batches of `batch_size` of the client's own training samples."""

    steps: int
    lr: float
    batch_size: int
    seed: int

    @classmethod
    def of(cls, config: Any) -> "FineTune | None":
        """Returns the fine-tuning `config` asks for (data.client_finetune_steps > 0), else None."""
        common = config.data.common
        steps = common["client_finetune_steps"]
        if not steps:
            return None
        lr = common["client_finetune_lr"]
        return cls(steps, config.local.lr if lr is None else lr, config.local.batch_size, config.seed)

    def run(self, task: Task, start: Tensor, x: Tensor, y: Tensor, indices: np.ndarray, client: int,
            at: int) -> Tensor:
        """Returns `start` after the steps on the samples `indices` of (x, y), keyed by (client, at)."""
        rows = job_indices(indices, self.batch_size, 1, self.steps, "epoch", False,
                           numpy_rng(self.seed, "client_finetune", client, at))
        batches = gather_batches(x, y, rows)
        params = start.detach().to(x.device)
        with torch.enable_grad():
            for k in range(batches.num_steps):
                grad, _ = task.grad_fn(params, batches[k])
                params = params - self.lr * grad
        return params


class ClientEvaluation:
    """The clients' test sets concatenated once; accuracies of one model or one model per client."""

    def __init__(self, data: FederatedData, finetune: FineTune | None = None):
        self.data = data
        self.finetune = finetune
        self.clients = np.array([i for i in range(data.num_clients) if len(data.client_test[i])], dtype=np.int64)
        parts = [data.client_test_data(int(i)) for i in self.clients]
        self.x = torch.cat([p[0] for p in parts])
        self.y = torch.cat([p[1] for p in parts])
        self.sizes = np.array([len(p[1]) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    @classmethod
    def of(cls, data: FederatedData, task: Task, finetune: FineTune | None = None) -> "ClientEvaluation | None":
        """Returns the evaluation for `data`, or None when no client has test data of its own
        or the task has no accuracy; raises ConfigError at data.client_finetune_steps when
        fine-tuning is asked for where it cannot run."""
        if task.kind != "classification" or not data.has_client_tests:
            if finetune is not None:
                raise ConfigError("data.client_finetune_steps", "fine-tunes for the per-client evaluation, which needs "
                                  "a classification task and clients with test data of their own "
                                  "(data.client_test_fraction > 0, or a source with per-user test sets)")
            return None
        if finetune is not None and task.has_stats:
            raise ConfigError("data.client_finetune_steps", "models with BatchNorm running statistics are not "
                              "fine-tuned per client; set 0 or use GroupNorm")
        return cls(data, finetune)

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

    def finetuned_accuracies(self, task: Task, params: Tensor, models: Tensor | None, batch_size: int,
                             at: int) -> np.ndarray:
        """Returns each client's accuracy on its own test data of its model (row of `models`,
        or the global `params`) after the client's own fine-tuning steps."""
        assert self.finetune is not None
        src = self.data.source
        acc = np.empty(len(self.clients))
        for k, client in enumerate(self.clients):
            start = models[client] if models is not None else params
            tuned = self.finetune.run(task, start, src.x_train, src.y_train, self.data.client_train[client],
                                      int(client), at)
            lo, hi = self.offsets[k], self.offsets[k + 1]
            acc[k] = float(self._correct(task, tuned, self.x[lo:hi], self.y[lo:hi], batch_size).to(torch.float64).mean())
        return acc

    def row(self, task: Task, params: Tensor, models: Tensor | None, batch_size: int, at: int = 0) -> dict[str, Any]:
        """Returns the per-client columns: node models on their own data when `models` is
        given (gossip), else the global model `params` on every client's data; with
        fine-tuning also the personalised ones (fine-tuning keyed by `at`, the evaluation time)."""
        was_training = task.module.training
        task.module.eval()
        try:
            if models is not None:
                row = summarise(self.node_accuracies(task, models, batch_size))
            else:
                row = summarise(self.accuracies(task, params, batch_size))
            if self.finetune is not None:
                row.update(summarise(self.finetuned_accuracies(task, params, models, batch_size, at), "client_acc_ft"))
            return row
        finally:
            task.module.train(was_training)


__all__ = ["ClientEvaluation", "FineTune", "summarise"]
