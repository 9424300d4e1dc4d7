"""Getting onto Ray for one run: a private local instance or an existing cluster, and the code.

* `connect`: reuses a Ray already initialised in this process; otherwise starts a private
  local Ray (``ray.address: null``; stopped again by `Connection.close`) or attaches to a
  cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``; only this driver disconnects).
* `loopback_only`: the private local Ray binds 127.0.0.1 and nothing else (Ray's own
  default is every interface of the machine).
* The code: actors must import *this* checkout's fedsim, its strategies and topologies included (a
  worktree or a clean clone, not whatever else is installed). `ray.code: path` puts the
  checkout first on the actors' PYTHONPATH; `upload` ships the package in the job's runtime
  environment (Ray uploads local folders only for a job, i.e. at ``ray.init``); `auto`
  connects, then reconnects with `upload` when some node runs on another machine.
* `ship_by_value`: plugin modules named in the config (often a .py file beside the config,
  not importable on workers) and `module:factory` strategies or models are pickled by
  value, so their code runs there.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config.plugins import plugin_module
from ..config.ray_section import RaySection
from ..errors import ConfigError, first_line

ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds fedsim/
# Ray's single-machine mode (its default on macOS and Windows), and no usage statistics
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class Connection:
    """How this run is attached to Ray; `close` undoes what `connect` did."""

    owned: bool  # this run called ray.init, so it calls ray.shutdown
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Stops the private local Ray, or disconnects this driver from the cluster."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()
        self.owned = False


def connect(section: RaySection) -> Connection:
    """Initialises Ray as `section` says and returns the connection (see the module docstring)."""
    import ray

    if ray.is_initialized():
        if section.code == "upload":
            raise ConfigError("ray.code", "'upload' ships the code when fedsim connects to Ray itself, but Ray "
                              "was already initialised in this process; use 'path' or connect through ray.address")
        return Connection(False, path_env())
    remote_client = (section.address or "").startswith("ray://")
    code = "upload" if section.code == "upload" or (section.code == "auto" and remote_client) else section.code
    _init(section, upload_env() if code == "upload" else None)
    if code == "auto":
        if _single_host():
            code = "path"
        else:  # other machines cannot see this checkout: connect again, shipping the packages
            ray.shutdown()
            _init(section, upload_env())
            code = "upload"
    return Connection(True, path_env() if code == "path" else {})


def _init(section: RaySection, runtime_env: dict[str, Any] | None) -> None:
    import ray

    options: dict[str, Any] = {"logging_level": logging.WARNING, "runtime_env": runtime_env}
    local = section.address is None
    if local:
        options.update(address="local", include_dashboard=False, num_cpus=section.num_cpus,
                       num_gpus=section.num_gpus, object_store_memory=section.object_store_memory)
    else:
        options.update(address=section.address)
    try:
        with warnings.catch_warnings(), (loopback_only() if local else nullcontext()):
            warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about a future accelerator env default
            ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "start a local Ray" if section.address is None else f"attach to Ray at {section.address!r}"
        raise ConfigError("ray.address", f"cannot {where}: {first_line(exc, None)}") from None


@contextmanager
def loopback_only() -> Iterator[None]:
    """Ray processes started inside this block (a local Ray, the nodes of a test cluster, and
    the workers they start later) listen on 127.0.0.1 only and report nothing off the machine.

    Ray replaces a node address of 127.0.0.1 by the machine's interface address, and its
    servers then listen on every interface; in Ray's single-machine mode the node address
    stays 127.0.0.1 and every server binds to it. The mode is an environment variable, which
    the processes started inside inherit, and a constant Ray reads from it when imported,
    which is set in this process for the block. Both are put back after it.
    """
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _single_host() -> bool:
    """True when every alive node of the cluster runs on this machine (and this is no Ray client)."""
    import ray
    from ray.util import get_node_ip_address
    from ray.util.client import ray as client

    if client.is_connected():
        return False
    here = get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))


def path_env() -> dict[str, Any]:
    """Returns the actors' runtime environment that puts this checkout first on their PYTHONPATH."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def upload_env() -> dict[str, Any]:
    """Returns the job's runtime environment that ships fedsim (strategies and topologies inside)."""
    from ..layout import installed_package

    return {"py_modules": [str(installed_package())], "excludes": ["__pycache__", "*.pyc"]}


def ship_by_value(modules: Sequence[str]) -> None:
    """Makes these user modules (plugins as the config names them, or module names) travel by
    value (see the module docstring)."""
    from ray import cloudpickle

    for spec in modules:
        module = sys.modules.get(plugin_module(spec))
        if module is not None:
            cloudpickle.register_pickle_by_value(module)
