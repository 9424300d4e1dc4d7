"""Name -> factory registries for every pluggable component.

A component is a plain function (factory) registered under a name; its keyword signature
is its configuration schema (see `fedsim.config.components`). Registering is one decorator
in one file: built-in modules are imported on lookup (the module named like the component
first, every built-in module when that one does not register it), user modules through the
config's `plugins:` list, and a name of the form ``package.module:factory`` is imported
directly without any registration (except within `registered_names_only`).
"""
from __future__ import annotations

import contextvars
import difflib
import importlib
import importlib.util
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """A registered factory and the name it is known by."""

    name: str
    factory: Callable[..., Any]

    @property
    def summary(self) -> str:
        doc = (self.factory.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def import_all(package: str) -> None:
    """Imports every module of `package`, so that their `register` decorators run."""
    pkg = importlib.import_module(package)
    if not hasattr(pkg, "__path__"):  # a plain module: importing it was enough
        return
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry:
    """Maps names to factories of one kind (strategies, topologies, partitioners, ...)."""

    def __init__(self, kind: str, builtin_packages: Iterable[str] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin_packages = tuple(builtin_packages)
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: registers `factory` under `name` and returns it unchanged."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            if not self._is_builtin(factory):
                self._load_builtins()  # a plugin's name must not shadow a built-in one not imported yet
            existing = self._entries.get(name)
            if existing is not None and existing.factory is not factory and (
                existing.factory.__module__ != factory.__module__
                or existing.factory.__qualname__ != factory.__qualname__
            ):
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory)
            return factory

        return deco

    def _is_builtin(self, factory: Callable[..., Any]) -> bool:
        module = getattr(factory, "__module__", "") or ""
        return any(module == p or module.startswith(p + ".") for p in self._builtin_packages)

    def _load_named(self, name: str) -> None:
        """Imports the built-in module named `name`, if any (the usual layout: one file per
        component); spares a lookup the import of every other built-in module and its
        dependencies (networkx, scipy, ray)."""
        if not name.isidentifier():
            return
        for package in self._builtin_packages:
            module = f"{package}.{name}"
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # `package` is a plain module
                found = False
            if found:
                importlib.import_module(module)

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for package in self._builtin_packages:
                import_all(package)

    def names(self) -> list[str]:
        """Returns the sorted names known to this registry (built-ins included)."""
        self._load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Returns all entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, path: str = "") -> Entry:
        """Returns the entry for `name`, or raises ConfigError at `path` listing the known names."""
        if name not in self._entries and not self._loaded:
            self._load_named(name)
        if name not in self._entries:
            self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            why = _DOTTED_REFUSED.get()
            if why is not None:
                raise ConfigError(path, f"{name[:120]!r} is not a registered {self.kind}; {why}")
            return Entry(name, _import_dotted(name, path))
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(path, f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")


_DOTTED_REFUSED: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedsim_dotted_refused", default=None)


@contextmanager
def registered_names_only(why: str) -> Iterator[None]:
    """Within the context, `Registry.get` refuses ``package.module:factory`` names (which
    import and call code) with a ConfigError ending in `why`: for configs that are data, such
    as one a Flower node receives from the server."""
    token = _DOTTED_REFUSED.set(why)
    try:
        yield
    finally:
        _DOTTED_REFUSED.reset(token)


def _import_dotted(spec: str, path: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(path, f"cannot import module {module_name!r} ({exc})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(path, f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(path, f"{spec!r} is not callable")
    return obj


STRATEGIES = Registry("strategy", ["fedsim.strategies"])
TOPOLOGIES = Registry("topology", ["fedsim.topologies"])
MIXING = Registry("mixing rule", ["fedsim.topologies"])
PROTOCOLS = Registry("protocol", ["fedsim.protocols"])
EXECUTORS = Registry("executor", ["fedsim.executors"])
DATA_SOURCES = Registry("data source", ["fedsim.data"])
PARTITIONERS = Registry("partitioner", ["fedsim.data"])
MODELS = Registry("model", ["fedsim.models"])
LOSSES = Registry("loss", ["fedsim.losses"])
COMPUTE_MODELS = Registry("compute model", ["fedsim.system"])
LINK_MODELS = Registry("link model", ["fedsim.system"])
AVAILABILITY_MODELS = Registry("availability model", ["fedsim.system"])
DROPOUT_MODELS = Registry("dropout model", ["fedsim.system"])
ADVERSARY_MODELS = Registry("adversary model", ["fedsim.system"])
