"""Whether two functions compute the same thing: same code, and equal values closed over.

A strategy factory returns closures; two runs whose configs differ only in server-side
settings (a server learning rate, server momentum) get client updates that are different
function objects but the same code over equal captured values. `same_function` tells those
apart from closures that capture a different client-side setting (FedProx's μ, SAM's ρ), so
a vectorised sweep can run several runs' clients through one of their `local` functions.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import torch

_PLAIN = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))


def same_function(a: Any, b: Any) -> bool:
    """Returns True when callables `a` and `b` are the same object, or Python functions with
    the same code, defaults, attributes and (recursively) equal closed-over values; bound
    methods and ``functools.partial`` objects are compared part by part. Anything else
    (another callable object, a value with no equality this module knows) counts as
    different unless it is the same object, so a True answer is never a guess."""
    return _same(a, b, set())


def _same(a: Any, b: Any, seen: set[tuple[int, int]]) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    pair = (id(a), id(b))
    if pair in seen:  # a cycle (a closure that refers to itself): equal so far
        return True
    seen.add(pair)
    if isinstance(a, _PLAIN):
        return a == b or (a != a and b != b)  # NaN equals NaN here
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and bool(torch.equal(a, b)))
    if isinstance(a, types.FunctionType):
        return (a.__code__ == b.__code__
                and _same(a.__defaults__, b.__defaults__, seen)
                and _same(a.__kwdefaults__, b.__kwdefaults__, seen)
                and _same(a.__dict__, b.__dict__, seen)
                and _same_cells(a.__closure__, b.__closure__, seen)
                and a.__globals__ is b.__globals__)
    if isinstance(a, types.MethodType):
        return _same(a.__func__, b.__func__, seen) and _same(a.__self__, b.__self__, seen)
    if isinstance(a, functools.partial):
        return _same(a.func, b.func, seen) and _same(a.args, b.args, seen) and _same(a.keywords, b.keywords, seen)
    if isinstance(a, (tuple, list)):  # NamedTuples included: their type was compared above
        return len(a) == len(b) and all(_same(x, y, seen) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], seen) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same(getattr(a, f.name), getattr(b, f.name), seen) for f in dataclasses.fields(a))
    return False


def _same_cells(a: tuple | None, b: tuple | None, seen: set[tuple[int, int]]) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        try:
            vx, vy = x.cell_contents, y.cell_contents
        except ValueError:  # an empty cell (a name assigned later in the enclosing function)
            return False
        if not _same(vx, vy, seen):
            return False
    return True
