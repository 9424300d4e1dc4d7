"""`${...}` interpolations: resolved once, when the config is read, and bounded before that.

A config may refer to its own values (``${data.num_clients}``, ``${.lr}``) and to the
environment (``${oc.env:VAR,default}``); omegaconf resolves them when the config is read,
and the resolved values are what the run uses and what config.yaml records. Two things are
refused with the key path:

* text that would grow past `MAX_RESOLVED_CHARS` when resolved — strings that repeat other
  strings that repeat others double at each step — or references chained more than
  `MAX_CHAIN` deep; estimated on the unresolved values, with memoisation;
* a resolved string that still contains ``${`` (an escaped ``\\${`` or an environment value
  holding one): it would be resolved again, differently, where it is read next (the
  component's own checks, or config.yaml when the run is resumed).
"""
from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, first_line

MAX_RESOLVED_CHARS = 1_000_000
MAX_CHAIN = 64

_OPEN = "${"
_NAME = re.compile(r"(\.*)([A-Za-z_][\w-]*(?:\.[\w-]+)*)")


def _join(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def _lookup(tree: Any, path: tuple[Any, ...]) -> tuple[bool, Any]:
    node = tree
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


class _Estimate:
    """Upper bound of each value's resolved size, in characters (a container: its leaves)."""

    def __init__(self, tree: dict[str, Any]):
        self.tree = tree
        self.sizes: dict[tuple[Any, ...], int] = {}
        self.open: set[tuple[Any, ...]] = set()

    def size(self, path: tuple[Any, ...], value: Any, chain: int) -> int:
        if path in self.sizes:
            return self.sizes[path]
        if path in self.open:  # a cycle: omegaconf reports it when resolving
            return 0
        if chain > MAX_CHAIN:
            raise ConfigError(_join(path), f"interpolations chained more than {MAX_CHAIN} deep")
        self.open.add(path)
        if isinstance(value, dict):
            total = sum(self.size(path + (k,), v, chain) for k, v in value.items())
        elif isinstance(value, list):
            total = sum(self.size(path + (str(i),), v, chain) for i, v in enumerate(value))
        elif isinstance(value, str) and _OPEN in value:
            total = len(value) + sum(self.size(ref, target, chain + 1) for ref, target in self.references(path, value))
        else:
            total = len(str(value))
        self.open.discard(path)
        if total > MAX_RESOLVED_CHARS:
            raise ConfigError(_join(path), f"resolving its interpolations gives more than {MAX_RESOLVED_CHARS:,} "
                                           "characters")
        self.sizes[path] = total
        return total

    def references(self, path: tuple[Any, ...], text: str) -> list[tuple[tuple[Any, ...], Any]]:
        """Every name after the first ``${`` that is a key path of the config (absolute, or
        relative with leading dots as omegaconf reads them): an over-estimate, never an under-."""
        found = []
        for m in _NAME.finditer(text, text.index(_OPEN)):
            dots, name = len(m.group(1)), m.group(2).split(".")
            base = path[: len(path) - dots] if dots else ()
            ok, target = _lookup(self.tree, base + tuple(name))
            if ok:
                found.append((base + tuple(name), target))
        return found


def _unresolved(value: Any, path: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """Returns the path of the first string holding ``${``, or None."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return path if isinstance(value, str) and _OPEN in value else None
    for k, v in items:
        found = _unresolved(v, path + (k,))
        if found is not None:
            return found
    return None


def resolve_interpolations(raw: dict[str, Any]) -> dict[str, Any]:
    """Returns `raw` with every interpolation resolved; raises ConfigError at the key path of
    an interpolation that fails, would grow too large, or resolves to text holding ``${``."""
    if _unresolved(raw) is not None:
        _Estimate(raw).size((), raw, 0)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        raise ConfigError(key, first_line(exc, None)) from None
    left = _unresolved(resolved)
    if left is not None:
        raise ConfigError(_join(left), "still holds '${' after its interpolations were resolved (an escaped \\${ or "
                                       "an environment value holding one); fedsim resolves interpolations once, when "
                                       "it reads the config, and records the results in config.yaml")
    return resolved  # type: ignore[return-value]
