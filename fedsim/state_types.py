"""The classes a checkpoint may hold: an allow-list that each state class joins itself.

A checkpoint stores dataclasses and named tuples as a tag naming their class
(``module:QualName``) plus their fields. Loading rebuilds only classes registered here with
the `checkpointable` decorator — fedsim's own state classes, and those of plugins, which
register the same way — so a checkpoint file can name nothing else to construct or call.
A checkpoint from a stranger is data: the worst it can do is fail to load.

Usage, on a strategy's or protocol's state class::

    from fedsim.state_types import checkpointable

    @checkpointable
    class MyState(NamedTuple):
        params: torch.Tensor
        step: int
"""
from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T", bound=type)

_REGISTERED: dict[str, type] = {}
# Checkpoints written before the built-in strategies and topologies moved under fedsim's
# namespace name their classes ``strategies.x:Cls``; they load as ``fedsim.strategies.x:Cls``.
RENAMED_PACKAGES = ("strategies.", "topologies.")


def qualified_name(cls: type) -> str:
    """Returns the name a checkpoint stores for `cls`: ``module:QualName``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def is_named_tuple(cls: type) -> bool:
    """True when `cls` is a named-tuple class."""
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def checkpointable(cls: T) -> T:
    """Class decorator: lets checkpoints hold instances of `cls` (a dataclass or a named
    tuple whose fields are tensors, numbers, strings, containers or other checkpointable
    classes); returns `cls` unchanged. A class defined again under the same name (a
    reloaded module) replaces the earlier one."""
    if not isinstance(cls, type) or not (dataclasses.is_dataclass(cls) or is_named_tuple(cls)):
        raise TypeError(f"@checkpointable takes a dataclass or a named tuple class, got {cls!r}")
    _REGISTERED[qualified_name(cls)] = cls
    return cls


def registered(cls: type) -> bool:
    """True when `cls` itself (not a subclass or namesake) is registered."""
    return _REGISTERED.get(qualified_name(cls)) is cls


def lookup(name: str) -> type | None:
    """Returns the registered class stored under `name` (``module:QualName``, or the older
    ``strategies.x:QualName`` of a built-in class, see `RENAMED_PACKAGES`), else None."""
    cls = _REGISTERED.get(name)
    if cls is None and name.startswith(RENAMED_PACKAGES):
        cls = _REGISTERED.get("fedsim." + name)
    return cls
