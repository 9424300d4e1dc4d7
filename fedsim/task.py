"""A Task turns a torch model into pure functions over flat parameter vectors.

* `loss(params, batch)`: masked mean loss via ``torch.func.functional_call`` — pure, so it
  runs under ``vmap``/``grad`` (the vectorised executor uses it).
* `grad_fn(params, batch)`: (gradient, loss) for one job step. It runs the model with its
  parameters bound as views of one flat leaf tensor — the same maths as `loss`, without
  functional_call's per-call overhead — and falls back to `loss` for modules where the
  binding does not reproduce functional_call's output.
* `evaluate(params, x, y)`: loss and accuracy (or the quadratic task's objective and
  distance to the optimum).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .config.components import Component
from .data.base import SourceData
from .errors import ConfigError
from .models import ModelContext, call_user_factory
from .params import ParamLayout
from .rng import cuda_index, key, keyed_torch, seed_torch
from .strategy import Batch, Tensor


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _check_supported(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            raise ConfigError(
                "model",
                f"layer {name!r} is BatchNorm with running statistics; fedsim keeps each client's "
                "model as one flat parameter vector and does not carry per-client buffers — use "
                "GroupNorm or LayerNorm (cnn: groupnorm=true), or BatchNorm(track_running_stats=False)",
            )


class Task:
    """Model + loss over flat parameter vectors; see the module docstring."""

    def __init__(self, module: nn.Module, kind: str, info: dict[str, Any] | None = None):
        _check_supported(module)
        self.module = module
        self.kind = kind
        self.info = info or {}
        params = dict(module.named_parameters())
        self.layout = ParamLayout.of(params)
        self.dtype = next(iter(params.values())).dtype if params else torch.float32
        self._fast: _BoundModule | None = None
        self._fast_checked = False

    # pickling (Ray) ships the module only; the bound copy is rebuilt on demand
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fast"], state["_fast_checked"] = None, False
        return state

    def initial_params(self) -> Tensor:
        """Returns the module's current parameters as one flat vector (a copy)."""
        return self.layout.flatten({k: v.detach() for k, v in self.module.named_parameters()}).clone()

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """Pure forward pass with `params` (functional_call)."""
        return functional_call(self.module, self.layout.views(params), (x,))

    def per_sample_loss(self, out: Tensor, batch: Batch) -> Tensor:
        """Returns the unreduced loss of each sample of `batch` given model outputs `out`.

        Cross-entropy is written as −log_softmax(out)[y], bitwise equal to ``cross_entropy``
        (values and gradients): under vmap, ``cross_entropy`` runs a decomposition whose shape
        check imports sympy, 0.35 s of a short run's start-up."""
        if self.kind == "quadratic":
            return 0.5 * batch.y * ((out - batch.x) ** 2).sum(-1)
        return -torch.log_softmax(out, -1).gather(-1, batch.y.unsqueeze(-1)).squeeze(-1)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        """Masked mean loss of `batch` at `params`; pure (usable under vmap and grad)."""
        return _masked_mean(self.per_sample_loss(self.forward(params, batch.x), batch), batch.mask)

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
            out = fast(leaf, batch.x)
            loss = _masked_mean(self.per_sample_loss(out, batch), batch.mask)
        else:
            loss = self.loss(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad, loss.detach()

    @torch.no_grad()
    def evaluate(self, params: Tensor, x: Tensor, y: Tensor, batch_size: int = 2048) -> dict[str, float | None]:
        """Returns {'loss', 'accuracy'} of `params` on (x, y); for the quadratic task also
        'dist_to_opt' (‖x − x*‖) and accuracy None."""
        was_training = self.module.training
        self.module.eval()
        try:
            total, correct, n = 0.0, 0, len(y)
            for start in range(0, n, batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                out = self.forward(params, xb)
                mask = torch.ones(len(yb), dtype=out.dtype, device=out.device)
                total += float(self.per_sample_loss(out, Batch(xb, yb, mask)).sum())
                if self.kind == "classification":
                    correct += int((out.argmax(-1) == yb).sum())
        finally:
            self.module.train(was_training)
        result: dict[str, float | None] = {"loss": total / max(n, 1)}
        if self.kind == "quadratic":
            result["accuracy"] = None
            if "optimum" in self.info:
                opt = torch.as_tensor(np.asarray(self.info["optimum"]), dtype=params.dtype, device=params.device)
                result["dist_to_opt"] = float(torch.linalg.vector_norm(params - opt))
        else:
            result["accuracy"] = correct / max(n, 1)
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
                b = task.forward(params, probe)
            return bound if torch.equal(a, b) else None
        except Exception:  # noqa: BLE001 - any failure means: use functional_call
            return None


def _probe_input(task: Task) -> Tensor:
    shape = task.info.get("input_shape")
    if shape is None:
        raise ValueError("no input shape")
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=gen, dtype=task.info.get("input_dtype", torch.float32))


def check_model_fits(module: nn.Module, name: str, source: SourceData) -> None:
    """Runs `module` on two training inputs (eval mode, no gradient, global RNG untouched);
    raises ConfigError at `model` unless it accepts them and gives one row of num_classes
    scores per input (classification) or one point per input (quadratic task)."""
    x = source.x_train[:2]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), keyed_torch(key(0, "model/check")):  # the global generator is restored after
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the model does not fit the data
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError("model", f"{name} does not accept the data's inputs of shape {list(x.shape[1:])}: "
                                   f"{type(exc).__name__}: {detail}") from None
    finally:
        module.train(was_training)
    want = (len(x), source.num_classes) if source.task == "classification" else tuple(x.shape)
    if not isinstance(out, Tensor) or tuple(out.shape) != want:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError("model", f"{name} gives outputs of shape {got} for {len(x)} inputs; the data needs "
                                   f"{list(want)} ({'one score per class' if source.task == 'classification' else 'one point per input'})")


def build_task(model: Component, source: SourceData, seed: int) -> Task:
    """Builds the model described by `model` for `source`, initialised from key(seed, 'init')."""
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
    check_model_fits(module, model.name, source)
    info = dict(source.info)
    info["input_shape"] = tuple(source.input_shape)
    info["input_dtype"] = source.x_train.dtype
    return Task(module, source.task, info)
