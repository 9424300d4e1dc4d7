"""User code named by a config: `plugins:` (module names or .py files) and `plugin_dirs:`.

A config is often run again from elsewhere than where it was written: `fedsim resume` reads
the run folder's config.yaml, and a saved config.yaml can be run as it is. So the resolved
config records where user code was found: a file plugin as its absolute path, and in
`plugin_dirs` the folders that module plugins and ``package.module:factory`` names were
imported from (those the interpreter would not find on its own).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError

OWN_PACKAGES = ("fedsim",)  # found wherever fedsim itself is (its strategies and topologies included)


def plugin_module(spec: str) -> str:
    """Returns the module name a plugin is imported as (a .py file: ``fedsim_plugin_<stem>``)."""
    return f"fedsim_plugin_{Path(spec).stem}" if spec.endswith(".py") else spec


def _add_to_path(folders: Iterable[str]) -> None:
    for folder in folders:
        if folder not in sys.path:
            sys.path.append(folder)


def import_plugin(spec: str, base_dir: Path) -> str:
    """Imports a plugin: a module name (searched also in `base_dir` and the working folder)
    or a path to a .py file (relative to `base_dir`, the config file's folder). Returns the
    spec as it finds the plugin from any folder: a file's absolute path, a module's name."""
    try:
        if spec.endswith(".py"):
            path = (base_dir / spec).resolve()
            if not path.is_file():
                raise ConfigError("plugins", f"plugin file not found: {path}")
            name = plugin_module(spec)
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                assert module_spec and module_spec.loader
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            return str(path)
        _add_to_path([str(base_dir), str(Path.cwd())])
        importlib.import_module(spec)
        return spec
    except ConfigError:
        raise
    except SystemExit as exc:
        raise ConfigError("plugins", f"{spec!r} called sys.exit({exc.code!r}) while being imported") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
        raise ConfigError("plugins", f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None


def load_plugins(specs: Sequence[str], dirs: Sequence[str], base_dir: Path) -> tuple[list[str], list[str]]:
    """Puts `dirs` (relative to `base_dir`) on the import path, then imports `specs`; returns
    (the specs as `import_plugin` returns them, the folders as absolute paths)."""
    folders = [os.path.abspath(base_dir / d) for d in dirs]
    _add_to_path(folders)
    return [import_plugin(s, base_dir) for s in specs], folders


def _standard_folders() -> set[str]:
    paths = sysconfig.get_paths()
    found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    found.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    found.add(site.getusersitepackages())
    return {os.path.abspath(p) for p in found}


def import_root(module_name: str) -> str | None:
    """Returns the folder on the import path that `module_name` (imported) was found in, or
    None when it has no location (a built-in module)."""
    module = sys.modules.get(module_name)
    depth = module_name.count(".")
    file = getattr(module, "__file__", None)
    if file:
        path = Path(os.path.abspath(file))
        return str(path.parents[depth + (path.stem == "__init__")])
    locations = list(getattr(module, "__path__", []) or [])  # a namespace package
    return str(Path(os.path.abspath(locations[0])).parents[depth]) if locations else None


def record_dirs(dirs: Sequence[str], modules: Iterable[str]) -> list[str]:
    """Returns `dirs` followed by the folders `modules` were imported from, leaving out file
    plugins, fedsim's own packages and the interpreter's standard and site-packages folders."""
    out = list(dict.fromkeys(dirs))
    standard = _standard_folders()
    for name in modules:
        if name.startswith("fedsim_plugin_") or name.partition(".")[0] in OWN_PACKAGES:
            continue
        root = import_root(name)
        if root is not None and root not in standard and root not in out:
            out.append(root)
    return out
