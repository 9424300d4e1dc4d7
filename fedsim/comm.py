"""Communication accounting: the bytes a message really costs on the wire."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .strategy import ClientOutput, Payload

SCALAR_BYTES = 4


def nbytes(obj: Any) -> int:
    """Returns the wire size of a tensor, a payload, an uplink, a mapping or sequence of them.

    Objects that know their own encoded size (compressed messages) expose ``nbytes``;
    Python scalars count as 4 bytes.
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Payload):
        return nbytes(obj.params) + nbytes(obj.extras)
    if isinstance(obj, ClientOutput):
        return nbytes(obj.update) + (nbytes(obj.extras) if obj.extras else 0)
    if isinstance(obj, dict):  # before the (slower) abstract Mapping check
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, Mapping):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, (int, float)):
        return SCALAR_BYTES
    size = getattr(obj, "nbytes", None)
    if isinstance(size, int):
        return size
    raise TypeError(f"cannot count the bytes of {type(obj).__name__}")
