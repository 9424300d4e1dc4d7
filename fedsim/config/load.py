"""Reads an experiment YAML plus `key=value` overrides into a validated `Config`."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .components import Component, dataclass_knobs, validate_knobs
from .interpolation import resolve_interpolations
from .plugins import import_plugin, load_plugins, plugin_module, record_dirs  # noqa: F401 - import_plugin: API
from .ray_section import RaySection
from .safe_yaml import MalformedYAML, parse_yaml
from .schema import COMPONENTS, NESTED_COMPONENTS, SCALARS, SECTIONS, LocalSection, RunSection


SYSTEM_KEYS = ("compute", "link", "availability", "dropout", "adversary")  # the behaviour models of `system`


@dataclass(frozen=True)
class SystemConfig:
    """The resolved behaviour models of the `system` section."""

    compute: Component
    link: Component
    availability: Component
    dropout: Component
    adversary: Component


@dataclass(frozen=True)
class Config:
    """A fully validated experiment configuration; nothing in it is a DictConfig."""

    name: str
    seed: int
    plugins: list[str]  # as found from any folder: a file plugin's absolute path, a module's name
    data: Component
    partition: Component
    model: Component
    strategy: Component
    local: LocalSection
    system: SystemConfig
    protocol: Component
    topology: Component | None
    executor: Component
    run: RunSection
    extra: dict[str, Any] = field(default_factory=dict)  # validated sections added by extensions
    plugin_dirs: list[str] = field(default_factory=list)  # folders user modules were imported from

    def resolved(self) -> dict[str, Any]:
        """Returns the configuration with every default filled in, as written to config.yaml."""
        data = self.data.resolved()
        data["partition"] = self.partition.resolved()
        out: dict[str, Any] = {
            "name": self.name,
            "seed": self.seed,
            "plugins": list(self.plugins),
            "plugin_dirs": list(self.plugin_dirs),
            "data": data,
            "model": self.model.resolved(),
            "strategy": self.strategy.resolved(),
            "local": asdict(self.local),
            "system": {k: getattr(self.system, k).resolved() for k in SYSTEM_KEYS},
            "protocol": self.protocol.resolved(),
            "executor": self.executor.resolved("kind"),
            "run": asdict(self.run),
        }
        if self.topology is not None:
            out["topology"] = self.topology.resolved()
        out.update(copy.deepcopy(self.extra))
        return out


# Extra top-level sections (name -> dataclass) registered by optional subsystems.
EXTRA_SECTIONS: dict[str, type] = {"ray": RaySection}


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parses `a.b=value` strings; values are read as YAML scalars/lists."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.path=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(item, "override has an empty key")
        try:
            value = parse_yaml(text, f"override {item!r}") if text.strip() else None
        except MalformedYAML:
            value = text
        except ConfigError as exc:  # refused YAML: its path is inside the value
            raise ConfigError(f"{key}.{exc.path}" if exc.path else key, exc.message) from None
        out.append((key.split("."), value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each `key.path=value` override set."""
    raw = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            spec = NESTED_COMPONENTS.get(".".join(keys[: i + 1])) or (COMPONENTS.get(k) if i == 0 else None)
            if isinstance(nxt, str) and spec is not None:  # shorthand `strategy: fedavg`
                nxt = {spec.name_key: nxt}
                node[k] = nxt
            if nxt is None:
                nxt = {}
                node[k] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(keys[: i + 1]), f"cannot set a sub-key on a {type(nxt).__name__}")
            node = nxt
        node[keys[-1]] = value
    return raw


def check_run_name(name: str) -> None:
    """Raises ConfigError unless `name` can be one folder name (runs/<name>-<time>): not empty,
    at most 200 characters, no path separators or control characters."""
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if not name or len(name) > 200 or bad:
        why = f"contains {', '.join(map(repr, bad))}" if bad else "is empty" if not name else "is longer than 200 characters"
        raise ConfigError("name", f"must be usable as a folder name (runs/<name>-<time>); {name[:60]!r} {why}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, raising ConfigError for missing files, malformed YAML and YAML
    that `parse_yaml` refuses (duplicate keys, alias bombs, deep nesting)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"{p} is a folder, not a config file" if p.is_dir() else f"config file not found: {p}")
    try:
        raw = parse_yaml(p.read_text(), str(p))
    except UnicodeDecodeError:
        raise ConfigError("", f"{p}: not a text (YAML) file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw




def integer_count(section: Any, key: str) -> Any:
    """Returns `section` with `key` as an int where it is a string of digits (an environment
    interpolation), so that a knob taking an integer or a word ('all') is typed as an integer."""
    if isinstance(section, Mapping) and isinstance(section.get(key), str) and section[key].strip().lstrip("-").isdigit():
        return {**section, key: int(section[key])}
    return section


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Builds a validated Config from a YAML path (or a mapping) and dot-list overrides.

    Raises ConfigError (exit status 2 in the CLI) naming the key path of the first problem.
    """
    raw = read_yaml(source) if isinstance(source, (str, Path)) else copy.deepcopy(dict(source))
    raw = apply_overrides(raw, overrides)
    raw = resolve_interpolations(raw)

    known = set(SCALARS) | set(COMPONENTS) | set(SECTIONS) | set(EXTRA_SECTIONS)
    for key in raw:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(str(key), f"unknown section{hint} (known: {', '.join(sorted(known))})")

    scalars = {}
    for key, (typ, default) in SCALARS.items():
        value = raw.get(key, default)
        if typ is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if typ is str and not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        if typ is list:
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                what = "folders" if key == "plugin_dirs" else "module names"
                raise ConfigError(key, f"expected a list of {what}, got {value!r}")
        scalars[key] = value
    check_run_name(scalars["name"])
    base_dir = Path(source).resolve().parent if isinstance(source, (str, Path)) else Path.cwd()
    plugins, plugin_dirs = load_plugins(scalars["plugins"], scalars["plugin_dirs"], base_dir)

    def section(name: str, cls: type) -> Any:
        value = raw.get(name) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a mapping, got {type(value).__name__}")
        return cls(**validate_knobs(name, value, dataclass_knobs(cls), f"section '{name}'"))

    local = section("local", LocalSection)
    run = section("run", RunSection)
    system_raw = raw.get("system") or {}
    if not isinstance(system_raw, Mapping):
        raise ConfigError("system", f"expected a mapping, got {type(system_raw).__name__}")
    for key in system_raw:
        if key not in SYSTEM_KEYS:
            raise ConfigError(f"system.{key}", f"unknown key (known keys: {', '.join(sorted(SYSTEM_KEYS))})")
    system = SystemConfig(**{k: NESTED_COMPONENTS[f"system.{k}"].resolve(f"system.{k}", system_raw.get(k)) for k in SYSTEM_KEYS})
    data = COMPONENTS["data"].resolve("data", integer_count(raw.get("data"), "num_clients"))
    partition = NESTED_COMPONENTS["data.partition"].resolve("data.partition", data.common["partition"])
    comps = {k: COMPONENTS[k].resolve(k, raw.get(k)) for k in ("model", "strategy", "protocol", "executor")}
    topology = COMPONENTS["topology"].resolve("topology", raw["topology"]) if raw.get("topology") is not None else None
    extra = {}
    for name, cls in EXTRA_SECTIONS.items():
        if name in raw:
            extra[name] = asdict(section(name, cls))

    if run.rounds is None and run.time_budget is None:
        raise ConfigError("run", "set a stopping rule: run.rounds and/or run.time_budget")
    named = [data, partition, *comps.values(), topology, *vars(system).values()]
    dotted = [c.name.partition(":")[0] for c in named if c is not None and ":" in c.name]  # 'module:factory'
    return Config(
        name=scalars["name"],
        seed=scalars["seed"],
        plugins=plugins,
        plugin_dirs=record_dirs(plugin_dirs, [*map(plugin_module, plugins), *dotted]),
        data=data,
        partition=partition,
        local=local,
        run=run,
        system=system,
        topology=topology,
        extra=extra,
        **comps,
    )
