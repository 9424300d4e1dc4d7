"""Generates the configuration reference (docs/config-reference.md) from the schema itself.

Plain sections come from their dataclasses; pluggable sections list every registered
choice with its knobs (type, default, checks, help) from the factory's signature and
docstring. A test regenerates it and fails when the committed page disagrees.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING
from typing import Any, Iterable

from .components import ComponentSpec, Knob, dataclass_knobs, signature_knobs
from .interpolation import MAX_CHAIN, MAX_RESOLVED_CHARS
from .load import EXTRA_SECTIONS
from .safe_yaml import MAX_CHARS, MAX_DEPTH, MAX_VALUES
from .schema import COMPONENTS, NESTED_COMPONENTS, SCALARS, SECTIONS, TOP_LEVEL_HELP


def type_name(t: Any) -> str:
    """Returns a short readable name of a knob's type."""
    if t is Any:
        return "any"
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin in (list, typing.List):
        return f"list[{type_name(args[0]) if args else 'any'}]"
    if origin in (dict, typing.Dict):
        return "mapping"
    return getattr(t, "__name__", str(t))


def _default(k: Knob) -> str:
    if k.default is MISSING:
        return "**required**"
    if k.default is None:
        return "null"
    return f"`{k.default!r}`".replace("'", '"') if isinstance(k.default, str) else f"`{k.default}`"


def knob_rows(knobs: Iterable[Knob]) -> list[str]:
    """Returns markdown table rows for knobs: key, type, default, constraint, meaning."""
    rows = []
    for k in knobs:
        checks = "; ".join(c.describe() for c in k.checks)
        help_ = " ".join(k.help.split()).replace("|", "\\|")
        rows.append(f"| `{k.name}` | {type_name(k.type)} | {_default(k)} | {checks} | {help_} |")
    return rows


HEADER = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]


def _component_section(path: str, spec: ComponentSpec) -> list[str]:
    lines = [f"### `{path}`", ""]
    default = f" (default `{spec.default}`)" if spec.default else ""
    lines.append(f"Choose with `{spec.name_key}:`{default}. Registered {spec.registry.kind}s:")
    lines.append("")
    if spec.common is not None:
        lines += ["Keys shared by every choice:", "", *HEADER, *knob_rows(dataclass_knobs(spec.common)), ""]
    for entry in spec.registry.entries():
        knobs = [k for k in signature_knobs(entry.factory, spec.context_params)
                 if not spec.common or k.name not in {c.name for c in dataclass_knobs(spec.common)}]
        lines.append(f"#### `{spec.name_key}: {entry.name}`")
        lines.append("")
        doc = " ".join((entry.factory.__doc__ or "").strip().split("\n\n")[0].split())
        if doc:
            lines += [doc, ""]
        if knobs:
            lines += [*HEADER, *knob_rows(knobs), ""]
        else:
            lines += ["No knobs.", ""]
    return lines


def yaml_rules() -> list[str]:
    """Returns the section on what a config file may contain (limits from their modules)."""
    return [
        "## The config file",
        "",
        "A config is a YAML mapping of the sections below; `key.path=value` overrides on the",
        "command line are read the same way. Refused with the key path and line, before",
        "anything runs:",
        "",
        "- a key given twice in one mapping (`local: {lr: 0.05, lr: 5.0}`); overriding a key that",
        "  a merge (`<<: *defaults`) brought in is fine;",
        "- keys that are not strings (`1:`, `on:`, `null:`; quote them) and values other than",
        "  strings, numbers, booleans, null, lists and mappings (dates, `!!binary`, `!!set`);",
        f"- nesting deeper than {MAX_DEPTH} levels, and documents that expand, through aliases",
        f"  (`*name`) and merges, to more than {MAX_VALUES:,} values or {MAX_CHARS:,} characters;",
        "  this is checked on the YAML node graph before anything is expanded.",
        "",
        "Interpolations are resolved once, when the config is read: `${data.num_clients}`,",
        "`${.lr}` (relative) and `${oc.env:VAR,default}` (an environment variable). The run",
        "uses the resolved values and config.yaml records them — an environment value",
        "included, so do not interpolate secrets. Refused: interpolations whose result would",
        f"exceed {MAX_RESOLVED_CHARS:,} characters or that chain more than {MAX_CHAIN} deep,",
        "and a resolved value that still holds `${` (an escaped `\\${`, or an environment",
        "value holding one), which would be resolved again, differently, when config.yaml",
        "is read on resume.",
        "",
    ]


def generate() -> str:
    """Returns the full configuration reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema by `fedsim config-reference` — do not edit by hand",
        "(a test fails when this page and the schema disagree). Every section, key, type,",
        "default, allowed range and meaning. Component sections take a name (or `kind` for",
        "`executor`) plus that choice's own keys; a bare string is shorthand for the name.",
        "",
        *yaml_rules(),
        "## Top level",
        "",
        "| key | meaning |",
        "|---|---|",
    ]
    for key in [*SCALARS, *COMPONENTS, *SECTIONS, *EXTRA_SECTIONS]:
        doc = TOP_LEVEL_HELP.get(key) or (EXTRA_SECTIONS[key].__doc__ if key in EXTRA_SECTIONS else "")
        lines.append(f"| `{key}` | {' '.join((doc or '').split())} |")
    lines.append("")
    for name, cls in {**SECTIONS, **EXTRA_SECTIONS}.items():
        if name == "system":
            continue
        lines += [f"## `{name}`", "", " ".join((cls.__doc__ or "").split()), "", *HEADER, *knob_rows(dataclass_knobs(cls)), ""]
    lines += ["## Components", ""]
    for path, spec in COMPONENTS.items():
        lines += _component_section(path, spec)
        nested = {p: s for p, s in NESTED_COMPONENTS.items() if p.startswith(path + ".")}
        for sub, sspec in nested.items():
            lines += _component_section(sub, sspec)
    lines += ["## `system`", "", " ".join((SECTIONS["system"].__doc__ or "").split()), ""]
    for path, spec in NESTED_COMPONENTS.items():
        if path.startswith("system."):
            lines += _component_section(path, spec)
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    """Returns the key paths of knobs that have no help text (documentation of every knob)."""
    missing = []
    for name, cls in {**SECTIONS, **EXTRA_SECTIONS}.items():
        missing += [f"{name}.{k.name}" for k in dataclass_knobs(cls) if not k.help.strip()]
    for path, spec in {**COMPONENTS, **NESTED_COMPONENTS}.items():
        if spec.common is not None:
            missing += [f"{path}.{k.name}" for k in dataclass_knobs(spec.common) if not k.help.strip()]
        for entry in spec.registry.entries():
            for k in signature_knobs(entry.factory, spec.context_params):
                if not k.help.strip():
                    missing.append(f"{path}[{entry.name}].{k.name}")
    return missing
