"""Typed, validated configuration of named components.

A component section is a mapping with a name key (``name``, or ``kind`` for executors)
plus the keyword arguments of the registered factory; a bare string is shorthand for
``{name: <string>}``. The factory's keyword signature is the schema: annotations give the
types (``Annotated[..., Check]`` adds value checks) and the Google-style ``Args:``
section of its docstring gives each knob's documentation (used by the config reference).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import MISSING, dataclass, field, make_dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from ..errors import ConfigError, first_line
from ..registry import Entry, Registry
from .checks import Check, OneOf

CONTEXT_PARAMS = ("ctx",)  # leading factory parameters filled by the engine, not by users


@dataclass(frozen=True)
class Knob:
    """One configuration key: its type for omegaconf, default, checks and documentation."""

    name: str
    type: Any
    default: Any = MISSING
    checks: tuple[Check, ...] = ()
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _split_annotation(ann: Any) -> tuple[Any, tuple[Check, ...]]:
    """Returns (omegaconf-compatible type, checks) for a factory parameter annotation."""
    checks: list[Check] = []
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        checks.extend(m for m in meta if isinstance(m, Check))
        inner, more = _split_annotation(base)
        return inner, tuple(checks) + more
    if origin is Literal:
        choices = typing.get_args(ann)
        return type(choices[0]), (OneOf(choices),)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(ann)) == 2:
            inner, more = _split_annotation(args[0])
            return typing.Optional[inner], more
        return Any, ()
    if origin in (tuple, list, Sequence, typing.Sequence):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        inner = _split_annotation(args[0])[0] if args else Any
        return typing.List[inner], ()
    if origin in (dict, Mapping, typing.Mapping):
        return typing.Dict[str, Any], ()
    if ann in (int, float, bool, str) or ann is Any:
        return ann, ()
    if ann is inspect.Parameter.empty:
        return Any, ()
    return Any, ()


_ARG_LINE = re.compile(r"^(\s+)(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


def docstring_args(fn: Callable[..., Any]) -> dict[str, str]:
    """Parses the ``Args:`` section of a Google-style docstring into {name: help}."""
    out: dict[str, str] = {}
    in_args, indent, current = False, None, None
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip() in ("Args:", "Arguments:", "Keyword Args:"):
            in_args, indent, current = True, None, None
            continue
        if not in_args:
            continue
        if line.strip() and not line.startswith(" "):
            in_args = False
            continue
        m = _ARG_LINE.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            current = m.group(2)
            out[current] = m.group(3).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def signature_knobs(fn: Callable[..., Any], skip: Sequence[str] = CONTEXT_PARAMS) -> list[Knob]:
    """Returns the user-facing knobs of a factory: its keyword parameters (minus `skip`, the
    ones the engine fills), typed and documented."""
    hints = typing.get_type_hints(fn, include_extras=True)
    helps = docstring_args(fn)
    knobs = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        typ, checks = _split_annotation(hints.get(p.name, inspect.Parameter.empty))
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        if isinstance(default, tuple):
            default = list(default)
        knobs.append(Knob(p.name, typ, default, checks, helps.get(p.name, "")))
    return knobs


def dataclass_knobs(cls: type) -> list[Knob]:
    """Returns the knobs of a config dataclass (help and checks from field metadata)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    knobs = []
    for f in dataclasses.fields(cls):
        typ, checks = _split_annotation(hints[f.name])
        default = f.default
        if default is MISSING and f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        knobs.append(Knob(f.name, typ, default, checks + tuple(f.metadata.get("checks", ())), f.metadata.get("help", "")))
    return knobs


def _schema(name: str, knobs: Sequence[Knob]) -> type:
    fields = []
    for k in knobs:
        if k.required:
            fields.append((k.name, k.type, field(default=MISSING)))
        elif isinstance(k.default, (list, dict)):
            fields.append((k.name, k.type, field(default_factory=lambda d=k.default: type(d)(d))))
        else:
            fields.append((k.name, k.type, field(default=k.default)))
    return make_dataclass(name, fields, kw_only=True)  # a required knob may follow common keys with defaults


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate_knobs(path: str, raw: Mapping[str, Any], knobs: Sequence[Knob], what: str) -> dict[str, Any]:
    """Types `raw` against `knobs` and runs their checks; returns {name: value} with defaults.

    Raises ConfigError naming the key path for unknown keys, wrong types, missing required
    values and failed checks.
    """
    known = {k.name for k in knobs}
    for key in raw:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(sorted(known)) or "none"
            raise ConfigError(_join(path, str(key)), f"unknown key for {what}{hint} (known keys: {listing})")
    schema = _schema("Schema", knobs)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), dict(raw))
        values = dataclasses.asdict(OmegaConf.to_object(merged))
    except MissingMandatoryValue as exc:
        raise ConfigError(_join(path, str(exc.full_key)), f"required by {what} but not given") from None
    except ConfigKeyError as exc:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(_join(path, str(exc.full_key)), "unknown key") from None
    except OmegaConfBaseException as exc:
        msg = first_line(exc, None)
        key = str(getattr(exc, "full_key", "") or "")
        raise ConfigError(_join(path, key), _friendly(msg)) from None
    except TypeError:  # OmegaConf merging a mapping into a list (or back) names no key: find it
        bad = next((k for k in raw if not _merges(schema, k, raw[k])), None)
        given = "a mapping" if isinstance(raw.get(bad), dict) else "a list" if isinstance(raw.get(bad), list) else "this value"
        raise ConfigError(_join(path, str(bad) if bad is not None else ""), f"{given} does not fit this key") from None
    for k in knobs:
        if _has_non_finite(values[k.name]):
            raise ConfigError(_join(path, k.name), f"must be a finite number (got {values[k.name]})")
        for check in k.checks:
            problem = check.problem(values[k.name])
            if problem:
                raise ConfigError(_join(path, k.name), problem)
    return values


def _merges(schema: Any, key: Any, value: Any) -> bool:
    """True when `{key: value}` alone merges into the structured `schema`."""
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), {key: value}))
        return True
    except (TypeError, OmegaConfBaseException):
        return False


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


def _friendly(msg: str) -> str:
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        return f"expected {m.group(3).lower()}, got {m.group(2)} {m.group(1)!r}"
    m = re.match(r"Incompatible value '(.*)' for field of type '(.+)'", msg)
    if m:
        return f"expected {m.group(2)}, got {m.group(1)}"
    return msg


def import_type(spec: str) -> Any:
    """Returns the class (or tuple of classes) named by ``"package.module:Name"``."""
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Component:
    """A resolved component: which factory, and the validated keyword arguments for it."""

    name: str
    entry: Entry
    kwargs: dict[str, Any]
    common: dict[str, Any]
    path: str
    name_key: str = "name"
    returns: str | None = None  # "package.module:Class" that the factory must return

    @property
    def dotted(self) -> bool:
        """Whether the factory was named ``package.module:factory`` rather than registered."""
        return ":" in self.name

    def build(self, *args: Any, **extra: Any) -> Any:
        """Calls the factory with `args` (engine context) and the validated kwargs; returns
        what it built.

        A ValueError raised by the factory becomes a ConfigError at this section's path; any
        error of a ``package.module:factory`` (whose signature may not fit what the engine
        passes) and a result that is not a `returns` one become a ConfigError at its name key.
        """
        try:
            built = self.entry.factory(*args, **self.kwargs, **extra)
        except ConfigError as exc:
            if exc.path and not exc.path.startswith(self.path):
                raise ConfigError(_join(self.path, exc.path), exc.message) from None
            raise
        except ValueError as exc:
            raise ConfigError(self.path, str(exc)) from None
        except (Exception, SystemExit) as exc:
            if not self.dotted:
                raise
            what = f"sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            raise ConfigError(_join(self.path, self.name_key), f"{self.name} failed: {what}") from None
        if self.returns is not None:
            cls = import_type(self.returns)
            if not isinstance(built, cls):
                want = " or ".join(c.__name__ for c in cls) if isinstance(cls, tuple) else cls.__name__
                raise ConfigError(_join(self.path, self.name_key),
                                  f"{self.name!r} returned {type(built).__name__}, not a {want}")
        return built

    def resolved(self, name_key: str = "name") -> dict[str, Any]:
        """Returns the section as it would be written back: name, common keys, kwargs."""
        return {name_key: self.name, **self.common, **self.kwargs}


@dataclass(frozen=True)
class ComponentSpec:
    """How to read one component section: its registry, name key, default, common keys."""

    registry: Registry
    name_key: str = "name"
    default: str | None = None
    common: type | None = None  # dataclass of keys shared by every choice (e.g. data.num_clients)
    context_params: tuple[str, ...] = CONTEXT_PARAMS  # factory parameters the engine fills
    returns: str | None = None  # "package.module:Class" every factory must return (checked when built)

    def resolve(self, path: str, raw: Any) -> Component:
        """Validates the section at `path` and returns the resolved Component."""
        if raw is None:
            raw = {}
        if isinstance(raw, str):
            raw = {self.name_key: raw}
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"expected a mapping with '{self.name_key}' or a name string, got {type(raw).__name__}")
        raw = dict(raw)
        name = raw.pop(self.name_key, self.default)
        if name is None:
            raise ConfigError(_join(path, self.name_key), f"required (known: {', '.join(self.registry.names())})")
        if not isinstance(name, str):
            raise ConfigError(_join(path, self.name_key), f"expected a name string, got {name!r}")
        entry = self.registry.get(name, _join(path, self.name_key))
        common_knobs = dataclass_knobs(self.common) if self.common else []
        try:
            own = signature_knobs(entry.factory, self.context_params)
        except Exception as exc:  # noqa: BLE001 - e.g. a builtin without a signature, unresolvable annotations
            raise ConfigError(_join(path, self.name_key),
                              f"cannot read the keyword arguments of {name!r} ({type(exc).__name__}: {exc})") from None
        common_names = {k.name for k in common_knobs}
        knobs = common_knobs + [k for k in own if k.name not in common_names]
        values = validate_knobs(path, raw, knobs, f"{self.registry.kind} {name!r}")
        common = {k.name: values.pop(k.name) for k in common_knobs}  # in declaration order (a set's varies)
        return Component(name, entry, values, common, path, self.name_key, self.returns)
