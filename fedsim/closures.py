"""Whether two functions compute the same thing: same code, and equal values closed over.

A strategy factory returns closures; two runs whose configs differ only in server-side
settings (a server learning rate, server momentum) get client updates that are different
function objects but the same code over equal captured values. `same_function` tells those
apart from closures that capture a different client-side setting (FedProx's μ, SAM's ρ), so
a vectorised sweep can run several runs' clients through one of their `local` functions.
`lift` goes one step further: closures that differ only in captured floats (μ, ρ, β) become
one template whose floats are passed in, so those runs can share a call too.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Sequence

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


class Lifted:
    """Functions that differ only in floats they close over, as one template: `build(values)`
    returns a function like theirs with those floats replaced by `values` (e.g. 0-d tensors,
    one per client under vmap); `values[r]` holds function r's own floats, `names` the
    captured names they were bound to."""

    def __init__(self, build: Callable[[Sequence[Any]], Callable], values: list[tuple[float, ...]],
                 names: tuple[str, ...]):
        self.build, self.values, self.names = build, values, names


def lift(fns: Sequence[Callable]) -> Lifted | None:
    """Returns the `Lifted` template of Python functions `fns` that have the same code,
    defaults and attributes and close over values that are equal (`same_function`) except
    for Python floats (at any depth of nested closures); None when they differ otherwise, or
    when they do not differ at all."""
    slots: list[tuple[str, tuple[float, ...]]] = []
    plan = _plan(list(fns), slots, set())
    if plan is None or not slots:
        return None

    def build(values: Sequence[Any]) -> Callable:
        if len(values) != len(slots):
            raise ValueError(f"{len(slots)} captured values expected, got {len(values)}")
        return _rebuild(plan, values)

    return Lifted(build, [tuple(v[r] for _, v in slots) for r in range(len(fns))], tuple(n for n, _ in slots))


def _plan(fns: list[Any], slots: list, active: set[int]) -> Any:
    """The rebuild plan of function 0 of `fns` (same structure as the others): the function
    itself when the others equal it, else (function, [(cell index, slot index | child plan)])."""
    first = fns[0]
    if all(_same(first, f, set()) for f in fns[1:]):
        return first
    if not all(isinstance(f, types.FunctionType) for f in fns) or id(first) in active:
        return None
    seen: set[tuple[int, int]] = set()
    if not all(f.__code__ == first.__code__ and f.__globals__ is first.__globals__
               and _same(first.__defaults__, f.__defaults__, seen) and _same(first.__kwdefaults__, f.__kwdefaults__, seen)
               and _same(first.__dict__, f.__dict__, seen) and (f.__closure__ is None) == (first.__closure__ is None)
               for f in fns[1:]):
        return None
    active.add(id(first))
    changes = []
    for i, name in enumerate(first.__code__.co_freevars):
        try:
            values = [f.__closure__[i].cell_contents for f in fns]
        except ValueError:  # an empty cell
            return None
        if all(_same(values[0], v, set()) for v in values[1:]):
            continue
        if all(type(v) is float for v in values):
            changes.append((i, len(slots)))
            slots.append((name, tuple(values)))
            continue
        child = _plan(values, slots, active)
        if child is None:
            return None
        changes.append((i, child))
    active.discard(id(first))
    return first, changes


def _rebuild(plan: Any, values: Sequence[Any]) -> Any:
    if not isinstance(plan, tuple):
        return plan  # equal in every function: shared as is
    fn, changes = plan
    cells = list(fn.__closure__)
    for i, what in changes:
        cells[i] = types.CellType(values[what] if isinstance(what, int) else _rebuild(what, values))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__ = fn.__qualname__, fn.__module__
    return new
