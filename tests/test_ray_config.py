"""Ray executor and `ray` section settings are checked before any Ray process starts."""
from __future__ import annotations

import pytest

from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.executors.base import build_executor

from .conftest import digits_config


def executor_of(**sections):
    return build_executor(load_config(digits_config(**sections)))


def test_groups_become_actor_kinds():
    ex = executor_of(executor={"kind": "ray", "groups": [{"num_actors": 2, "num_gpus": 0.25},
                                                         {"num_actors": 1, "num_cpus": 4, "resources": {"big": 1}}]},
                     ray={"address": "auto", "code": "upload"})
    assert [(g.num_actors, g.num_cpus, g.num_gpus) for g in ex.groups] == [(2, 1.0, 0.25), (1, 4.0, 0.0)]
    assert ex.groups[0].demand() == {"CPU": 1.0, "GPU": 0.25} and ex.groups[1].demand() == {"CPU": 4.0, "big": 1.0}
    assert (ex.section.address, ex.section.code) == ("auto", "upload")


@pytest.mark.parametrize("executor, sections, message", [
    ({"groups": [{"num_actors": 1}, {"num_actors": 1, "num_cpus": 0}]}, {}, "executor.groups.1.num_cpus: must be > 0"),
    ({"groups": [{"num_actors": 1}, {"num_cpus": 2}]}, {}, "executor.groups.1.num_actors: required when"),
    ({"groups": [{"num_actor": 1}]}, {}, "executor.groups.0.num_actor: unknown key for actor group; did you mean 'num_actors'?"),
    ({"num_gpus": -0.5}, {}, "executor.num_gpus: must be >= 0"),
    ({"on_client_error": "ignore"}, {}, "executor.on_client_error: must be one of"),
    ({}, {"ray": {"adress": "auto"}}, "ray.adress: unknown key for section 'ray'; did you mean 'address'?"),
    ({}, {"ray": {"code": "ship"}}, "ray.code: must be one of"),
])
def test_bad_settings_name_their_key(executor, sections, message):
    with pytest.raises(ConfigError) as info:
        executor_of(executor={"kind": "ray", **executor}, **sections)
    assert str(info.value).startswith(message), str(info.value)


def test_vmap_worker_takes_the_vmap_executors_settings_but_its_device():
    ex = executor_of(executor={"kind": "ray", "worker": "vmap", "num_gpus": 0.5, "vmap": {"precision": "tf32"}})
    assert ex.vmap_options["precision"] == "tf32" and "device" not in ex.vmap_options
    assert ex.groups[0].demand() == {"CPU": 1.0, "GPU": 0.5}  # two actors share one GPU


@pytest.mark.parametrize("executor, message", [
    ({"worker": "vmap", "vmap": {"device": "cuda"}}, "executor.vmap.device: unknown key for the vmap worker"),
    ({"worker": "vmap", "vmap": {"precision": "fp64"}}, "executor.vmap.precision: must be one of"),
    ({"vmap": {"precision": "tf32"}}, "executor.vmap: settings of the vmap worker, but worker is 'serial'"),
    ({"worker": "vmap", "on_client_error": "drop"}, "executor.on_client_error: worker: vmap supports only 'stop'"),
])
def test_bad_vmap_worker_settings_name_their_key(executor, message):
    with pytest.raises(ConfigError) as info:
        executor_of(executor={"kind": "ray", **executor})
    assert str(info.value).startswith(message), str(info.value)
