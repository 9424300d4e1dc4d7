"""Every registered strategy, under every protocol it declares, on the serial and the vmap executor.

A strategy is covered by registering it: the table below is built from the registry. Each
pair runs a few rounds of a tiny federated quadratic and must

* move the model and stay finite;
* keep its server state's structure (types, tensor shapes and dtypes) from `init` on;
* give the same model on the vmap executor as on the serial one, to float rounding.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from fedsim.registry import PROTOCOLS, STRATEGIES
from fedsim.strategy import kind_of

from .conftest import quadratic_config, run_config

PROTOCOL_SETTINGS = {
    "sync": {"name": "sync", "clients_per_round": 3},
    "async": {"name": "async", "concurrency": 3, "buffer_size": 2},
    "decentralized": {"name": "decentralized"},
    "async_gossip": {"name": "async_gossip", "init": "shared"},
}


def _pairs() -> list[tuple[str, str]]:
    pairs = []
    for name in STRATEGIES.names():
        strategy = STRATEGIES.get(name).factory()
        kind = kind_of(strategy)
        for proto in PROTOCOLS.names():
            built = PROTOCOLS.get(proto).factory()
            if built.strategy_kind == kind and (strategy.protocols is None or proto in strategy.protocols):
                pairs.append((name, proto))
    return pairs


def _config(strategy: str, protocol: str, executor: dict[str, Any]) -> dict[str, Any]:
    cfg = quadratic_config(
        data={"num_clients": 5, "dim": 4}, strategy={"name": strategy}, protocol=PROTOCOL_SETTINGS[protocol],
        local={"lr": 0.05, "batch_size": 1, "steps": 3}, run={"rounds": 3, "eval_every": 3, "torch_threads": 1},
        system={"compute": {"name": "lognormal", "mean": 1.0, "sigma": 0.5}}, executor=executor,
    )
    if PROTOCOL_SETTINGS[protocol]["name"] in ("decentralized", "async_gossip"):
        cfg["topology"] = {"name": "ring"}
    return cfg


def _structure(tree: Any) -> Any:
    """The shape of a state tree: container types, tensor shapes and dtypes (not values)."""
    if isinstance(tree, torch.Tensor):
        return ("tensor", tuple(tree.shape), tree.dtype)
    if isinstance(tree, tuple):
        return (type(tree).__name__, tuple(_structure(v) for v in tree))
    if isinstance(tree, dict):
        return ("dict", tuple(sorted((k, _structure(v)) for k, v in tree.items())))
    return type(tree).__name__


PAIRS = _pairs()


def test_the_table_covers_every_strategy():
    assert {name for name, _ in PAIRS} == set(STRATEGIES.names())
    assert {proto for _, proto in PAIRS} == set(PROTOCOL_SETTINGS)


# strategies whose local update vmap cannot map under their default settings: the executor
# runs their jobs client by client, with a warning (none today; a compressed uplink whose
# compressor seeds a torch.Generator from its key would be one: tests/test_compression.py)
FALLS_BACK: set[str] = set()


@pytest.mark.parametrize("strategy,protocol", PAIRS, ids=[f"{s}-{p}" for s, p in PAIRS])
def test_strategy_under_protocol_serial_equals_vmap(strategy, protocol):
    serial = run_config(_config(strategy, protocol, {"kind": "serial"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # what vmap cannot vectorise falls back, with a warning
        vm = run_config(_config(strategy, protocol, {"kind": "vmap", "device": "cpu"}))
    assert (vm.ctx.executor.unsupported is not None) == (strategy in FALLS_BACK), vm.ctx.executor.unsupported
    start = serial.ctx.initial_params
    got = [r.protocol.eval_params(r.ctx, r.final_state) for r in (serial, vm)]
    assert torch.isfinite(got[0]).all() and not torch.equal(got[0], start), "the model did not move"
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-7)
    assert serial.rows[-1]["round"] == vm.rows[-1]["round"] and serial.rows[-1]["aggregations"] > 0
    if kind_of(serial.ctx.strategy) == "server":
        initial = serial.ctx.strategy.init(start)
        assert _structure(serial.final_state.server) == _structure(initial)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy,protocol", PAIRS, ids=[f"{s}-{p}" for s, p in PAIRS])
def test_strategy_under_protocol_on_the_gpu_equals_serial(strategy, protocol):
    # keep_on_device: the model, the updates and the server's arithmetic on the GPU, while the
    # state store returns clients' states and server-side memory on the CPU; 3 of 5 clients per
    # round, so cohorts mix returning clients with first-time ones. No silent fallback.
    serial = run_config(_config(strategy, protocol, {"kind": "serial"}))
    fallback = "fallback" if strategy in FALLS_BACK else "error"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpu = run_config(_config(strategy, protocol, {"kind": "vmap", "device": "cuda", "keep_on_device": True,
                                                      "on_unsupported": fallback}))
    got = [r.protocol.eval_params(r.ctx, r.final_state) for r in (serial, gpu)]
    torch.testing.assert_close(got[1].cpu(), got[0], rtol=1e-4, atol=1e-6)
    assert serial.rows[-1]["round"] == gpu.rows[-1]["round"]
