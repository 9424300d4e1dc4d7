"""Malicious clients (system.adversary): each attack against its definition, keyed draws, the
same results on the serial and vmap executors, and robust aggregation surviving attacks that
break plain averaging on a quadratic whose optimum is known."""
from __future__ import annotations

import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.errors import ConfigError, DivergenceError
from fedsim.runner import build
from fedsim.system.adversary import alie_z, malicious_ids
from fedsim.system.models import SystemContext
from fedsim.registry import ADVERSARY_MODELS

from .conftest import digits_config, quadratic_config, run_config

U = torch.tensor([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0], [7.0, 4.0]], dtype=torch.float64)
BAD = np.array([False, True, False, True])
JOBS = np.array([10, 11, 12, 13])


def attack(name: str, **knobs):
    return ADVERSARY_MODELS.get(name).factory(SystemContext(4, 0), **knobs).attack


def test_update_attacks_by_definition():
    honest = U[[0, 2]]
    mu, sd = honest.mean(0), honest.std(0, unbiased=False)
    expected = {
        "sign_flip": -2.0 * U,
        "scale": 5.0 * U,
        "alie": (mu - 1.5 * sd).expand_as(U),
        "ipm": (-0.5 * mu).expand_as(U),
    }
    knobs = {"sign_flip": {"scale": 2.0}, "scale": {"scale": 5.0}, "alie": {"z": 1.5}, "ipm": {"epsilon": 0.5}}
    for name, want in expected.items():
        got = attack(name, **knobs[name])(U, BAD, JOBS)
        torch.testing.assert_close(got[1::2], want[1::2], msg=name)
        assert torch.equal(got[0::2], U[0::2]), f"{name} changed an honest row"


def test_alie_default_z_follows_the_paper():
    # m = 50 rows, b = 12 malicious: s = ⌊50/2 + 1⌋ − 12 = 14, z = Φ⁻¹(36/50)
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))


def test_gaussian_attack_is_keyed_by_job_and_has_the_configured_scale():
    big = torch.zeros(2, 20_000, dtype=torch.float64)
    noise = attack("gaussian", sigma=3.0)
    first = noise(big, np.array([True, True]), np.array([5, 6]))
    again = noise(big, np.array([True, False]), np.array([5, 99]))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], first[1])
    assert float(first.std()) == pytest.approx(3.0, rel=0.02)


def test_malicious_clients_are_a_keyed_fraction_or_named_ids():
    picked = malicious_ids(100, 7, 0.2, None)
    assert len(picked) == 20 and np.array_equal(picked, malicious_ids(100, 7, 0.2, None))
    assert not np.array_equal(picked, malicious_ids(100, 8, 0.2, None))
    assert malicious_ids(100, 7, 0.2, [5, 2, 5]).tolist() == [2, 5]
    with pytest.raises(ConfigError, match="system.adversary.ids"):
        build(load_config(quadratic_config(system={"adversary": {"name": "sign_flip", "ids": [10]}})))


def test_label_flipping_changes_only_the_malicious_clients_labels():
    clean = build(load_config(digits_config())).ctx.data
    run = build(load_config(digits_config(system={"adversary": {"name": "label_flip", "ids": [1, 4]}})))
    data = run.ctx.data
    bad = np.concatenate([data.client_train[1], data.client_train[4]])
    good = np.setdiff1d(np.arange(len(data.y_train)), bad)
    assert torch.equal(data.y_train[bad], 9 - clean.y_train[bad])
    assert torch.equal(data.y_train[good], clean.y_train[good])


def test_attacks_that_cannot_run_are_config_errors():
    gossip = quadratic_config(protocol={"name": "decentralized"}, strategy={"name": "gossip"}, topology={"name": "ring"},
                              system={"adversary": {"name": "sign_flip", "fraction": 0.2}})
    with pytest.raises(ConfigError, match="system.adversary.name"):
        build(load_config(gossip))
    with pytest.raises(ConfigError, match="system.adversary.name: label flipping needs a classification"):
        build(load_config(quadratic_config(system={"adversary": {"name": "label_flip", "fraction": 0.2}})))


SMALL = {"data": {"num_clients": 6, "dim": 4}, "local": {"lr": 0.05, "batch_size": 1, "steps": 3},
         "run": {"rounds": 3, "eval_every": 3, "torch_threads": 1},
         "system": {"compute": {"name": "lognormal", "mean": 1.0, "sigma": 0.5}}}


@pytest.mark.parametrize("adversary", [{"name": "gaussian", "sigma": 2.0, "fraction": 0.34},
                                       {"name": "alie", "ids": [0, 3]}, {"name": "sign_flip", "ids": [1]}])
@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 4},
                                      {"name": "async", "concurrency": 3, "buffer_size": 2}])
def test_attacks_give_the_same_run_on_serial_and_vmap(adversary, protocol):
    def final(executor):
        cfg = quadratic_config(**SMALL, protocol=protocol, executor=executor)
        cfg["system"]["adversary"] = adversary
        run = run_config(cfg)
        return run.protocol.eval_params(run.ctx, run.final_state)

    clean = run_config(quadratic_config(**SMALL, protocol=protocol))
    serial = final({"kind": "serial"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vm = final({"kind": "vmap", "device": "cpu"})
    torch.testing.assert_close(vm, serial, rtol=1e-5, atol=1e-7)
    assert not torch.equal(serial, clean.protocol.eval_params(clean.ctx, clean.final_state)), "the attack did nothing"


def _homogeneous(strategy, adversary):
    """10 clients sharing the optimum x* = 0 (a_i = 1, b_i = 0), starting 9 away from it."""
    return quadratic_config(data={"center_std": 0.0, "curvature_min": 1.0, "curvature_max": 1.0},
                            model={"name": "vector", "init_std": 3.0}, strategy=strategy,
                            system={"adversary": adversary}, run={"rounds": 10, "eval_every": 10})


@pytest.mark.parametrize("reducer", ["median", {"name": "krum", "f": 2}, {"name": "bulyan", "f": 2}])
def test_robust_reducers_tolerate_two_byzantine_clients_where_fedavg_does_not(reducer):
    attack_ = {"name": "sign_flip", "scale": 10.0, "ids": [3, 7]}
    honest = run_config(_homogeneous({"name": "fedavg"}, {"name": "none"})).rows[-1]["dist_to_opt"]
    assert honest < 0.1
    try:
        plain = run_config(_homogeneous({"name": "fedavg"}, attack_)).rows[-1]["dist_to_opt"]
    except DivergenceError:
        plain = float("inf")
    assert plain > 100
    robust = run_config(_homogeneous({"name": "robust", "reducer": reducer}, attack_)).rows[-1]["dist_to_opt"]
    assert robust < 0.1
