"""`fedsim sweep --ray-address`: the runs as Ray tasks on a cluster give the same table as local workers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedsim.executors.ray_cluster import loopback_only
from fedsim.sweep import parse_axes, sweep

from .conftest import exposed_sockets, loopback_ray_cluster, quadratic_config

AXES = ["local.lr=0.05,0.08"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs, as `ray start --head` makes it."""
    with loopback_ray_cluster(num_cpus=2) as c:
        yield c


def table(path: Path) -> list[dict]:
    with path.open() as fh:
        return [{k: v for k, v in row.items() if k not in ("wall_time", "how")} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_ray_sweep_gives_the_local_table(cluster, tmp_path):
    import ray

    cfg = quadratic_config(run={"rounds": 10, "eval_every": 5})
    lines: list[str] = []
    with loopback_only():  # the driver's own Ray processes: 127.0.0.1 only
        rows = sweep(cfg, parse_axes(AXES), SEEDS, tmp_path / "ray", ray_address=cluster.address,
                     print_line=lines.append)
    assert not ray.is_initialized()  # the sweep detached its driver again
    assert [r["status"] for r in rows] == ["done"] * 4
    assert len([line for line in lines if line.startswith("[")]) == 4
    sweep(cfg, parse_axes(AXES), SEEDS, tmp_path / "local", workers=1, print_line=lambda _: None)
    assert table(tmp_path / "ray" / "sweep.csv") == table(tmp_path / "local" / "sweep.csv")
    assert (tmp_path / "ray" / "summary.csv").read_text().count("\n") == 3
    assert exposed_sockets() == []
