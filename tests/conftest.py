"""Shared test helpers: small configs and in-process runs."""
from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")


def _has_cuda() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


# Without a GPU, Triton kernels (executor.conv: triton) run in Triton's interpreter, on CPU
# tensors. Triton reads the variable when it is first imported, so it is set here, first.
if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips the tests marked `cuda` (they need a CUDA GPU) where torch sees none, as in CI;
    on a GPU machine `pytest -m cuda` runs exactly these."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def quadratic_config(**sections: Any) -> dict[str, Any]:
    """A deterministic federated-quadratic run: 10 clients, full batch, 10 local steps."""
    cfg: dict[str, Any] = {
        "name": "quad",
        "seed": 0,
        "data": {"name": "quadratic", "num_clients": 10, "partition": "natural", "dim": 5},
        "model": {"name": "vector"},
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.05, "batch_size": 1, "steps": 10},
        "protocol": {"name": "sync"},
        "run": {"rounds": 50, "eval_every": 10, "progress": False, "partition_plot": False},
    }
    return merge(cfg, sections)


def digits_config(**sections: Any) -> dict[str, Any]:
    """A small digits run (8 clients, 4 per round, a few rounds)."""
    cfg: dict[str, Any] = {
        "name": "digits",
        "seed": 1,
        "data": {"name": "digits", "num_clients": 8, "partition": {"name": "dirichlet_per_class", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.1, "batch_size": 16, "epochs": 1},
        "system": {"compute": {"name": "lognormal", "mean": 0.01, "sigma": 0.5}},
        "protocol": {"name": "sync", "clients_per_round": 4},
        # partition.png costs a matplotlib figure per run; test_partition_skew checks it is drawn
        "run": {"rounds": 6, "eval_every": 2, "progress": False, "partition_plot": False},
    }
    return merge(cfg, sections)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges `extra` into a copy of `base` (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def run_config(cfg: dict[str, Any], out: Path | None = None, overrides: tuple[str, ...] = ()):
    """Loads and executes a config in-process; returns the Run."""
    from fedsim.config import load_config
    from fedsim.runner import execute

    return execute(load_config(cfg, overrides), out, progress=False)


@contextmanager
def collector_paused():
    """Pauses Python's cyclic garbage collector: a test that times fedsim's own work is not
    timing a full collection of the test process's heap (~1 s after many tests)."""
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def tutorial_plugin(page: str, folder: Path, plugin_file: str) -> dict[str, Any]:
    """Writes the first ```python block of docs/`page` to folder/`plugin_file` and returns the
    page's first ```yaml block as a config mapping (the tutorials' code, executed as written)."""
    import re

    import yaml

    blocks = re.findall(r"```(python|yaml)\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)
    (folder / plugin_file).write_text(next(code for lang, code in blocks if lang == "python"))
    return yaml.safe_load(next(code for lang, code in blocks if lang == "yaml"))


def fedsim_cmd(*args: str) -> list[str]:
    """The command line that runs this checkout's fedsim CLI."""
    return [sys.executable, "-m", "fedsim", *args]


@contextmanager
def loopback_ray_cluster(num_cpus: int):
    """Starts a Ray cluster head (`ray.cluster_utils.Cluster`, as `ray start --head` does) with
    `num_cpus` CPUs on 127.0.0.1 only, yields it inside `loopback_only` (so that nodes added
    and processes started in the block bind loopback too) and shuts it down after."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from fedsim.executors.ray_cluster import loopback_only

    # Cluster registers itself as "the" Ray of this machine (where ray.init() with no address
    # attaches); put back what was there, so that no other process wanders into it.
    pointer = Path(get_ray_address_file(None))
    before = pointer.read_text() if pointer.exists() else None
    with loopback_only():
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": num_cpus, "include_dashboard": False})
        if before is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_text(before)
        try:
            yield c
        finally:
            c.shutdown()


def exposed_sockets() -> list[str]:
    """Returns the sockets of this process and of every process it started (and they started)
    that listen for TCP or are bound for UDP on an address other than loopback, each as
    'name[pid] address:port' (the Ray tests check that Ray's processes bind 127.0.0.1 only)."""
    import ipaddress
    import socket

    import psutil

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return (addr.ipv4_mapped or addr).is_loopback if addr.version == 6 else addr.is_loopback

    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            bound = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            if bound and c.laddr and not loopback(c.laddr.ip):
                found.append(f"{name}[{proc.pid}] {c.laddr.ip}:{c.laddr.port}")
    return found


@pytest.fixture
def tmp_yaml(tmp_path: Path):
    """Writes a config mapping to a YAML file and returns its path."""
    import yaml

    def write(cfg: dict[str, Any], name: str = "cfg.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(cfg))
        return p

    return write


@pytest.fixture(autouse=True, scope="module")
def _forget_test_plugins():
    """Names a test module's plugins registered (tutorial files, test strategies) and the
    plugin modules it imported are dropped after it, so no test file sees another's components."""
    from fedsim import registry
    from fedsim.compressors import COMPRESSORS

    regs = [v for v in vars(registry).values() if isinstance(v, registry.Registry)] + [COMPRESSORS]
    before = [set(r._entries) for r in regs]
    modules = set(sys.modules)
    yield
    for reg, names in zip(regs, before):
        for name, entry in list(reg._entries.items()):
            if name not in names and not reg._is_builtin(entry.factory):
                del reg._entries[name]
    for name in set(sys.modules) - modules:
        if name.startswith("fedsim_plugin_"):
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """runner.build applies run.torch_threads to the whole process (also from module-scoped
    fixtures); every test leaves the process with torch's default thread count again."""
    import torch

    yield
    torch.set_num_threads(_TORCH_THREADS)


def _default_torch_threads() -> int:
    import torch

    return torch.get_num_threads()


_TORCH_THREADS = _default_torch_threads()  # read when pytest loads this file, before any test
