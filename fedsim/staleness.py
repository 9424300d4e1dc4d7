"""Staleness weights s(τ) as plain functions of the staleness τ (server versions behind).

Configured as a name or a mapping: ``staleness: constant``, ``{name: polynomial, a: 0.5}``,
``{name: hinge, a: 10, b: 4}``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

StalenessFn = Callable[[int], float]


def constant() -> StalenessFn:
    """s(τ) = 1."""
    return lambda tau: 1.0


def polynomial(a: float = 0.5) -> StalenessFn:
    """s(τ) = (1 + τ)^(−a); a = 0.5 is FedBuff's 1/√(1+τ)."""
    return lambda tau: float((1.0 + tau) ** (-a))


def hinge(a: float = 10.0, b: float = 4.0) -> StalenessFn:
    """s(τ) = 1 if τ ≤ b, else 1 / (a(τ − b) + 1) (Xie et al., FedAsync)."""
    return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


POLICIES: dict[str, Callable[..., StalenessFn]] = {"constant": constant, "polynomial": polynomial, "hinge": hinge}


def from_config(spec: Any) -> StalenessFn:
    """Builds a staleness function from a name or {name: ..., **params}; raises ValueError."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"staleness must be a name or a mapping with 'name' (got {spec!r})")
    params = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name not in POLICIES:
        raise ValueError(f"unknown staleness policy {name!r} (known: {', '.join(POLICIES)})")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ValueError(f"staleness {name!r}: {exc}") from None
