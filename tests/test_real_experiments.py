"""experiments/real/: every config runs through the CLI on tiny files in the layout its
README asks for (a few steps, two clients), so a user with the real files is one command away."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.outputs import read_jsonl

from .conftest import ROOT
from .test_folders import write_mnist
from .test_leaf import femnist_users, write_leaf

CONFIGS = sorted((ROOT / "experiments" / "real").glob("*.yaml"))
# serial: vmap's grouped convolutions of ResNet-18 take minutes on a 2-core CPU
SHRINK = ["data.num_clients=2", "local.steps=1", "local.batch_size=4", "executor.kind=serial", "run.torch_threads=1",
          "run.partition_plot=false"]


def write_cifar10_binary(root: Path) -> None:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [*[(f"data_batch_{i}.bin", 4) for i in range(1, 6)], ("test_batch.bin", 3)]:
        rows = np.concatenate([np.arange(n)[:, None] % 10, rng.integers(0, 256, (n, 3072))], axis=1)
        (folder / name).write_bytes(rows.astype(np.uint8).tobytes())


def write_shakespeare(root: Path) -> None:
    line = "To be, or not to be: that is the question"
    users = {role: ([line[i:i + 20] for i in range(3)], [line[i + 20] for i in range(3)]) for role in ("HAMLET", "OPHELIA")}
    write_leaf(root, users, {role: (xs[:1], ys[:1]) for role, (xs, ys) in users.items()})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_real_experiment_runs_on_tiny_files(config, tmp_path):
    data = tmp_path / "data"
    if "cifar10" in config.stem:
        write_cifar10_binary(data)
    elif "femnist" in config.stem:
        write_leaf(data, femnist_users(2, 4), femnist_users(2, 2, seed=1))
    elif "shakespeare" in config.stem:
        write_shakespeare(data)
    else:
        write_mnist(data, n_train=20, n_test=4)
    extra = [f"data.root={data}"]
    if "resnet18" in config.stem:  # ResNet-18 itself is tested in test_models.py; 40x cheaper here
        extra += ["model.name=resnet20"]
    if "gossip" in config.stem:
        extra += ["run.time_budget=3", "run.eval_every_time=1", "protocol.eval_nodes=2", "topology.degree=1"]
    else:
        extra += ["run.rounds=1", "run.eval_every=1"]
        if "dirichlet" in config.stem:
            extra += ["protocol.eval_nodes=2"]
        elif "async" in config.stem:
            extra += ["protocol.concurrency=2", "protocol.buffer_size=2"]
        else:
            extra += ["protocol.clients_per_round=2"]
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", *SHRINK, *extra]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows and rows[-1]["test_loss"] == rows[-1]["test_loss"]  # finite, not NaN
