"""Without `ray.address`, a run starts its own local Ray and stops it at the end."""
from __future__ import annotations

import pytest

from .conftest import digits_config, merge, run_config
from .test_determinism import strip

ray = pytest.importorskip("ray")


@pytest.mark.slow  # starting a Ray instance: ~10-30 s on 2 shared cores
def test_private_local_ray_is_started_and_stopped():
    assert not ray.is_initialized()
    cfg = digits_config(run={"rounds": 2, "eval_every": 1, "torch_threads": 1})
    serial = run_config(cfg).rows
    run = run_config(merge(cfg, {"executor": {"kind": "ray", "num_actors": 2}, "ray": {"num_cpus": 2}}))
    assert not ray.is_initialized()
    assert strip(run.rows) == strip(serial)
    assert len(run.ctx.executor.placement) == 2
