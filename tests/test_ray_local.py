"""Without `ray.address`, a run starts its own local Ray, on 127.0.0.1 only, and stops it at the end."""
from __future__ import annotations

import pytest

from fedsim.config import load_config
from fedsim.runner import build, drive

from .conftest import digits_config, exposed_sockets, merge, run_config
from .test_determinism import strip

ray = pytest.importorskip("ray")


@pytest.mark.slow  # starting a Ray instance: ~10-30 s on 2 shared cores
def test_private_local_ray_listens_on_loopback_only_and_is_stopped():
    assert not ray.is_initialized()
    cfg = digits_config(run={"rounds": 2, "eval_every": 1, "torch_threads": 1})
    serial = run_config(cfg).rows
    run = build(load_config(merge(cfg, {"executor": {"kind": "ray", "num_actors": 2}, "ray": {"num_cpus": 2}})))
    try:  # the actors have started: their workers listen too
        assert exposed_sockets() == []
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    except BaseException:
        run.ctx.executor.close()
        raise
    rows = drive(run, None, progress=False)
    assert not ray.is_initialized()
    assert strip(rows) == strip(serial)
    assert len(run.ctx.executor.placement) == 2
