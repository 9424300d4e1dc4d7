"""Value constraints attached to config fields with `typing.Annotated`.

    def fedavg(server_lr: Annotated[float, Gt(0)] = 1.0): ...

The schema builder strips the annotation for omegaconf and runs the checks after typing,
so an impossible value is reported with its key path before any work starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Check:
    """Base class: `problem(value)` returns None when fine, else what is wrong."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Gt(Check):
    """value > bound."""

    bound: float

    def problem(self, value: Any) -> str | None:
        if _num(value) and not value > self.bound:
            return f"must be > {self.bound} (got {value})"
        return None

    def describe(self) -> str:
        return f"> {self.bound}"


@dataclass(frozen=True)
class Ge(Check):
    """value >= bound."""

    bound: float

    def problem(self, value: Any) -> str | None:
        if _num(value) and not value >= self.bound:
            return f"must be >= {self.bound} (got {value})"
        return None

    def describe(self) -> str:
        return f">= {self.bound}"


@dataclass(frozen=True)
class Range(Check):
    """lo <= value <= hi (each end open when `open_lo` / `open_hi`)."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def problem(self, value: Any) -> str | None:
        if not _num(value):
            return None
        lo_ok = value > self.lo if self.open_lo else value >= self.lo
        hi_ok = value < self.hi if self.open_hi else value <= self.hi
        if lo_ok and hi_ok:
            return None
        return f"must be in {self.describe()} (got {value})"

    def describe(self) -> str:
        return f"{'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'}"


@dataclass(frozen=True)
class OneOf(Check):
    """value is one of the listed choices."""

    choices: Sequence[Any]

    def problem(self, value: Any) -> str | None:
        if value is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))} (got {value!r})"
        return None

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))


@dataclass(frozen=True)
class Finite(Check):
    """value is a finite number."""

    def problem(self, value: Any) -> str | None:
        if _num(value) and not math.isfinite(value):
            return f"must be finite (got {value})"
        return None

    def describe(self) -> str:
        return "finite"


@dataclass(frozen=True)
class Each(Check):
    """Applies `check` to every element of a list value."""

    check: Check

    def problem(self, value: Any) -> str | None:
        for i, item in enumerate(value or ()):
            msg = self.check.problem(item)
            if msg:
                return f"element {i} {msg}"
        return None

    def describe(self) -> str:
        return f"each {self.check.describe()}"


@dataclass(frozen=True)
class CountOrAll(Check):
    """value is an integer (not a bool) or the word 'all'."""

    def problem(self, value: Any) -> str | None:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool)):
            return None
        return f"must be an integer or 'all' (got {value!r})"

    def describe(self) -> str:
        return "integer or 'all'"


def physical_memory() -> int | None:
    """Returns this machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclass(frozen=True)
class FitsInMemory(Check):
    """value × `bytes_each` fits in this machine's physical memory; `bytes_each` is a lower
    bound of what one unit (a client) costs, so only counts that cannot fit are refused."""

    bytes_each: int
    what: str

    def problem(self, value: Any) -> str | None:
        memory = physical_memory()
        if not _num(value) or memory is None or value * self.bytes_each <= memory:
            return None
        return (f"{value:,} {self.what} need at least {_bytes(value * self.bytes_each)} of memory "
                f"({self.bytes_each} B each), more than this machine's {_bytes(memory)}")

    def describe(self) -> str:
        return f"× {self.bytes_each} B ≤ physical memory"
