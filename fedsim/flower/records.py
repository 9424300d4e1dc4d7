"""Fedsim tensors as Flower records and back, bit for bit.

A Flower message carries a `RecordDict` of `ArrayRecord`s (named arrays), `MetricRecord`s
and `ConfigRecord`s (numbers, strings). Each tensor here becomes one `flwr.app.Array`
holding NumPy's ``.npy`` bytes, which keep dtype and shape, so ``decode(encode(x))`` is
identical to ``x``:

* a model-shaped flat vector (the parameters, an update) is split by the model's
  `ParamLayout` into one array per named tensor — Flower-side tools see the usual
  ``state_dict`` (``record.to_torch_state_dict()``);
* named tensors (``Payload.extras``, ``ClientOutput.extras``, a client's persistent state)
  become one array each; Python numbers among them go to a `ConfigRecord` beside it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..params import ParamLayout
from ..strategy import Tensor

Scalar = (bool, int, float)


def tensor_to_array(t: Tensor) -> Array:
    """Returns `t` (any shape, a dtype NumPy knows) as a Flower Array; raises TypeError otherwise."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise TypeError("bfloat16 tensors cannot travel in Flower records (NumPy has no bfloat16)")
    return Array(t.contiguous().numpy())


def array_to_tensor(a: Array) -> Tensor:
    """Returns the tensor held by a Flower Array (dtype and shape as sent)."""
    return torch.from_numpy(a.numpy().copy())


def vector_to_record(flat: Tensor, layout: ParamLayout) -> ArrayRecord:
    """Returns a flat vector of the model's size as an ArrayRecord with one array per model tensor."""
    if flat.ndim != 1 or flat.numel() != layout.dim:
        raise ValueError(f"expected a flat vector of {layout.dim} values, got shape {tuple(flat.shape)}")
    return ArrayRecord({name: tensor_to_array(view) for name, view in layout.views(flat).items()})


def record_to_vector(record: ArrayRecord, layout: ParamLayout) -> Tensor:
    """Inverse of `vector_to_record`; raises ValueError if the record's names or shapes differ."""
    if tuple(record.keys()) != layout.names:
        raise ValueError(f"record holds {list(record.keys())}, the model has {list(layout.names)}")
    parts = {name: array_to_tensor(record[name]) for name in layout.names}
    for (name, shape), part in zip(zip(layout.names, layout.shapes), parts.values()):
        if tuple(part.shape) != shape:
            raise ValueError(f"record's {name!r} has shape {tuple(part.shape)}, the model's {shape}")
    return layout.flatten(parts)


def tensors_to_records(named: Mapping[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """Splits name -> tensor-or-number into (arrays, numbers); raises TypeError for anything else."""
    arrays, numbers = ArrayRecord(), ConfigRecord()
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            arrays[name] = tensor_to_array(value)
        elif isinstance(value, Scalar):
            numbers[name] = value
        else:
            raise TypeError(f"{name!r}: cannot send a {type(value).__name__} in a Flower record (tensors and numbers only)")
    return arrays, numbers


def records_to_tensors(arrays: ArrayRecord, numbers: ConfigRecord | None = None) -> dict[str, Any]:
    """Inverse of `tensors_to_records`: name -> tensor, and name -> number for the numbers."""
    out: dict[str, Any] = {name: array_to_tensor(a) for name, a in arrays.items()}
    if numbers is not None:
        out.update(numbers)
    return out
