"""A Task turns a torch model into pure functions over flat parameter vectors.

* `loss(params, batch)`: the task kind's masked mean loss (`fedsim.losses`) via
  ``torch.func.functional_call`` — pure, so it runs under ``vmap``/``grad`` (the vectorised
  executor uses it).
* `grad_fn(params, batch)`: (gradient, loss) for one job step. It runs the model with its
  parameters bound as views of one flat leaf tensor — the same maths as `loss`, without
  functional_call's per-call overhead — and falls back to `loss` for modules where the
  binding does not reproduce functional_call's output.
* `evaluate(params, x, y)`: loss, accuracy and the kind's metrics (`fedsim.losses`).

A model with BatchNorm running statistics carries them as the last entries of the flat
vector (`fedsim.batchnorm`): `step_grad_fn` then also returns the updated statistics, and
`prepare` wraps the strategy's local update to carry them.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from . import losses
from .augment import normalize
from .batchnorm import tracked_layers, with_running_stats, with_tracked_batchnorm
from .config.components import Component
from .data.base import SourceData
from .errors import ConfigError, first_line
from .models import ModelContext, call_user_factory
from .params import ParamLayout
from .rng import cuda_index, key, keyed_torch, seed_torch
from .strategy import Batch, Strategy, Tensor


class Task:
    """Model + loss over flat parameter vectors; see the module docstring."""

    def __init__(self, module: nn.Module, kind: str, info: dict[str, Any] | None = None,
                 loss_fn: Any = None, bn: str = "global", norm: tuple[Tensor, Tensor] | None = None):
        if kind not in losses.KINDS:
            raise ConfigError("data.name", f"the source's task {kind!r} is not one fedsim trains "
                                           f"(known: {', '.join(losses.KINDS)})")
        module, stat_names = with_tracked_batchnorm(module)
        self.module = module
        self.kind = kind
        self.info = info or {}
        self.loss_fn = loss_fn  # a user's per-sample loss (model.loss), None: the kind's own
        self.bn = bn
        self.norm = norm  # per-channel (mean, std) the inputs are normalised by, None: as they are
        params = dict(module.named_parameters())
        self.param_dim = ParamLayout.of(params).dim
        buffers = dict(module.named_buffers())
        self.stat_names = tuple(stat_names)
        self.layout = ParamLayout.of({**params, **{n: buffers[n] for n in stat_names}})
        self.dtype = next(iter(params.values())).dtype if params else torch.float32
        self._fast: _BoundModule | None = None
        self._fast_checked = bool(stat_names)  # no bound fast path for models with running statistics

    def with_module(self, module: nn.Module) -> "Task":
        """Returns a Task of the same kind, loss and BatchNorm mode around `module` (a copy of
        this one's, e.g. moved to a device)."""
        return Task(module, self.kind, self.info, loss_fn=self.loss_fn, bn=self.bn, norm=self.norm)

    # pickling (Ray) ships the module only; the bound copy is rebuilt on demand
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fast"], state["_fast_checked"] = None, False
        return state

    @property
    def has_stats(self) -> bool:
        """Whether the model carries BatchNorm running statistics in its flat vector."""
        return bool(self.stat_names)

    def flatten_module(self, module: nn.Module) -> Tensor:
        """Returns the parameters (and running statistics) of `module`, this task's module or
        a copy of it, as one flat vector in this task's layout."""
        tensors = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        tensors.update({n: buffers[n] for n in self.stat_names})
        return self.layout.flatten({k: v.detach() for k, v in tensors.items()})

    def initial_params(self) -> Tensor:
        """Returns the module's current parameters (and running statistics) as one flat vector (a copy)."""
        return self.flatten_module(self.module).clone()

    def prepare(self, strategy: Strategy) -> Strategy:
        """Returns the strategy whose local update runs with `step_grad_fn`: itself, or for a
        model with running statistics the wrapped one that carries them (idempotent)."""
        return with_running_stats(strategy, self.param_dim, self.bn) if self.has_stats else strategy

    @property
    def step_grad_fn(self) -> Any:
        """The gradient function the executors hand to a prepared strategy's local update:
        `grad_fn`, or `stats_grad_fn` for a model with running statistics."""
        return self.stats_grad_fn if self.has_stats else self.grad_fn

    def inputs(self, x: Tensor) -> Tensor:
        """The model's inputs for data `x`: normalised per channel when configured."""
        return x if self.norm is None else normalize(x, *self.norm)

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """Pure forward pass with `params` (functional_call) on data `x`."""
        return functional_call(self.module, self.layout.views(params), (self.inputs(x),))

    def batch_loss(self, out: Tensor, batch: Batch) -> Tensor:
        """The training loss of `batch` given model outputs `out` (`losses.batch_loss`)."""
        return losses.batch_loss(self.kind, out, batch.y, batch.x, batch.mask, self.loss_fn)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        """Masked mean loss of `batch` at `params`; pure (usable under vmap and grad)."""
        return self.batch_loss(self.forward(params, batch.x), batch)

    def loss_and_stats(self, params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Returns (loss, running statistics after this batch as a detached flat vector) at
        `params` (which hold the statistics before it); pure, for
        ``grad_and_value(has_aux=True)``."""
        layers = tracked_layers(self.module)
        for layer in layers:
            layer.row_mask = batch.mask
        try:
            loss = self.loss(params, batch)
            new = torch.cat([t.reshape(-1) for layer in layers for t in layer.new_stats])
        finally:
            for layer in layers:
                layer.row_mask = layer.new_stats = None
        return loss, new.detach()

    def stats_grad_fn(self, params: Tensor, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns (∇ loss(params, batch), (loss, running statistics after the batch)), detached."""
        leaf = params.detach().requires_grad_(True)
        loss, new = self.loss_and_stats(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        return (grad if grad is not None else torch.zeros_like(leaf)), (loss.detach(), new)

    def _fast_path(self) -> "_BoundModule | None":
        if not self._fast_checked:
            self._fast_checked = True
            self._fast = _BoundModule.try_build(self)
        return self._fast

    def grad_fn(self, params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Returns (∇ loss(params, batch), loss) as detached tensors."""
        leaf = params.detach().requires_grad_(True)
        fast = self._fast_path()
        if fast is not None:
            loss = self.batch_loss(fast(leaf, self.inputs(batch.x)), batch)
        else:
            loss = self.loss(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad, loss.detach()

    @torch.no_grad()
    def evaluate(self, params: Tensor, x: Tensor, y: Tensor, batch_size: int = 2048) -> dict[str, float | None]:
        """Returns {'loss', 'accuracy'} of `params` on (x, y) plus the kind's ``test_*``
        metrics (`losses.eval_metrics`; accuracy None where the kind has none); for the
        quadratic task also 'dist_to_opt' (‖x − x*‖)."""
        was_training = self.module.training
        self.module.eval()
        try:
            sums: dict[str, Tensor] = {}
            for start in range(0, len(y), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                losses.add_sums(sums, losses.eval_sums(self.kind, self.forward(params, xb), yb, xb, self.loss_fn))
        finally:
            self.module.train(was_training)
        result = losses.eval_metrics(self.kind, sums, len(y), self.loss_fn is not None) if sums else \
            {"loss": 0.0, "accuracy": None if self.kind != "classification" else 0.0}
        if self.kind == "quadratic" and "optimum" in self.info:
            opt = torch.as_tensor(np.asarray(self.info["optimum"]), dtype=params.dtype, device=params.device)
            result["dist_to_opt"] = float(torch.linalg.vector_norm(params - opt))
        return result


class _BoundModule:
    """A copy of the module whose parameters are replaced by views of a flat tensor per call."""

    def __init__(self, module: nn.Module, layout: ParamLayout):
        self.module = copy.deepcopy(module)
        index = {name: i for i, name in enumerate(layout.names)}
        originals = dict(module.named_parameters(remove_duplicate=False))
        ident = {id(p): n for n, p in module.named_parameters()}
        self.slots: list[tuple[nn.Module, str, int]] = []
        for full, p in originals.items():
            owner_name, _, attr = full.rpartition(".")
            owner = self.module.get_submodule(owner_name) if owner_name else self.module
            self.slots.append((owner, attr, index[ident[id(p)]]))
        for owner, attr, _ in self.slots:
            owner._parameters.pop(attr, None)
        self.layout = layout

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        views = list(self.layout.views(flat).values())
        for owner, attr, i in self.slots:
            owner.__dict__[attr] = views[i]
        return self.module(x)

    @classmethod
    def try_build(cls, task: Task) -> "_BoundModule | None":
        """Builds the bound copy if it reproduces functional_call on a probe input, else None."""
        try:
            bound = cls(task.module, task.layout)
            params = task.initial_params()
            probe = _probe_input(task)
            bound.module.train(task.module.training)
            # random layers draw the same masks in both calls; the generators are put back, so
            # the job this first call runs in draws from its own key as every later job does
            cuda = cuda_index(params.device)
            with torch.no_grad(), keyed_torch(0, cuda):
                a = bound(params, probe)
                seed_torch(0, cuda)
                b = functional_call(task.module, task.layout.views(params), (probe,))
            return bound if torch.equal(a, b) else None
        except Exception:  # noqa: BLE001 - any failure means: use functional_call
            return None


def _probe_input(task: Task) -> Tensor:
    shape = task.info.get("input_shape")
    if shape is None:
        raise ValueError("no input shape")
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=gen, dtype=task.info.get("input_dtype", torch.float32))


def _wanted_shape(source: SourceData, n: int) -> tuple[tuple[int, ...], str]:
    """Returns (output shape the task needs for n inputs, what it is in words)."""
    c = source.num_classes
    if source.task == "classification":
        return (n, c), "one score per class"
    if source.task == "multilabel":
        return (n, c), "one score per label"
    if source.task == "regression":
        return (n, c), "one value per target"
    if source.task == "lm":
        return (n, *source.input_shape, c), "one score per token of the vocabulary at every position"
    return (n, *source.input_shape), "one point per input"


def check_model_fits(module: nn.Module, name: str, source: SourceData, shape_free: bool = False) -> None:
    """Runs `module` on two training inputs (eval mode, no gradient, global RNG untouched);
    raises ConfigError at `model` unless it accepts them and (unless `shape_free`: a custom
    loss decides) gives the outputs the task kind needs (`_wanted_shape`)."""
    x = source.x_train[:2]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), keyed_torch(key(0, "model/check")):  # the global generator is restored after
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the model does not fit the data
        detail = first_line(exc, None)
        raise ConfigError("model", f"{name} does not accept the data's inputs of shape {list(x.shape[1:])}: "
                                   f"{type(exc).__name__}: {detail}") from None
    finally:
        module.train(was_training)
    want, words = _wanted_shape(source, len(x))
    if not isinstance(out, Tensor) or (not shape_free and tuple(out.shape) != want):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError("model", f"{name} gives outputs of shape {got} for {len(x)} inputs; the data needs "
                                   f"{list(want)} ({words})")


def input_norm(data_common: dict[str, Any], source: SourceData) -> tuple[Tensor, Tensor] | None:
    """Returns the (mean, std) of `data.normalize_mean`/`normalize_std` as tensors, None when
    unset; raises ConfigError unless both are given, one per channel of image inputs."""
    mean, std = data_common.get("normalize_mean"), data_common.get("normalize_std")
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        missing = "data.normalize_std" if std is None else "data.normalize_mean"
        raise ConfigError(missing, "required when the other of normalize_mean/normalize_std is set")
    shape = list(source.input_shape)
    if len(shape) != 3 or not source.x_train.is_floating_point():
        raise ConfigError("data.normalize_mean", f"normalisation is per channel of images [C, H, W]; the data has "
                                                 f"inputs of shape {shape}")
    for name, values in (("normalize_mean", mean), ("normalize_std", std)):
        if len(values) != shape[0]:
            raise ConfigError(f"data.{name}", f"needs one value per channel ({shape[0]}), got {len(values)}")
    dtype = source.x_train.dtype
    return torch.tensor(mean, dtype=dtype), torch.tensor(std, dtype=dtype)


def build_task(model: Component, source: SourceData, seed: int, data_common: dict[str, Any] | None = None) -> Task:
    """Builds the model described by `model` for `source`, initialised from key(seed, 'init'),
    with the loss and BatchNorm mode of its common keys and the input normalisation of the
    data section's (`data_common`)."""
    if source.task not in losses.KINDS:
        raise ConfigError("data.name", f"the source's task {source.task!r} is not one fedsim trains "
                                       f"(known: {', '.join(losses.KINDS)})")
    loss_fn = losses.resolve_loss(model.common.get("loss", "auto"))
    ctx = ModelContext(tuple(source.input_shape), source.num_classes, source.task, source.x_train.dtype)
    with keyed_torch(key(seed, "init")):
        if ":" in model.name:
            try:
                module = call_user_factory(model.entry.factory, ctx, model.kwargs)
            except Exception as exc:  # noqa: BLE001 - user code: report at the config key
                raise ConfigError("model.name", f"{model.name} failed: {type(exc).__name__}: {exc}") from None
        else:
            module = model.build(ctx)
    if not isinstance(module, nn.Module):
        raise ConfigError("model.name", f"{model.name} returned {type(module).__name__}, not a torch.nn.Module")
    if not any(True for _ in module.parameters()):
        raise ConfigError("model", "the model has no parameters")
    module = module.to(source.x_train.dtype) if source.task == "quadratic" else module
    check_model_fits(module, model.name, source, shape_free=loss_fn is not None)
    info = dict(source.info)
    info["input_shape"] = tuple(source.input_shape)
    info["input_dtype"] = source.x_train.dtype
    norm = input_norm(data_common or {}, source)
    return Task(module, source.task, info, loss_fn=loss_fn, bn=model.common.get("bn", "global"), norm=norm)
