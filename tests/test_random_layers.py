"""Random layers (dropout) draw from keyed streams only: the same numbers on the serial, Ray
and vmap executors and after a resume, whatever ran before in the process, and a run leaves
the process's global generators as it found them.

The model is a plugin (written into a temporary folder): an MLP with a Dropout layer and,
with ``mc: true``, a dropout that stays on at evaluation (Monte-Carlo dropout), so that the
driver's own draws (evaluation, a strategy's server part) are exercised too.
"""
from __future__ import annotations

import random
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from fedsim.checkpoint import list_checkpoints
from fedsim.cli import main
from fedsim.config import load_config
from fedsim.executors.base import Worker, WorkerSpec
from fedsim.outputs import read_jsonl
from fedsim.runner import build
from fedsim.strategy import LocalHP, Payload

from .conftest import ROOT, digits_config, fedsim_cmd, merge, run_config
from .test_determinism import strip

DROP_NET = '''
"""An MLP with dropout (and, with mc, dropout at evaluation too), for the random-layer tests."""
import math

from torch import nn

from fedsim.registry import MODELS


class DropNet(nn.Module):
    def __init__(self, inputs, classes, mc):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 32), nn.Dropout(0.3), nn.ReLU(),
                                  nn.Linear(32, classes))
        self.mc = mc

    def forward(self, x):
        out = self.body(x)
        return nn.functional.dropout(out, 0.2, training=True) if self.mc else out


@MODELS.register("drop_net")
def drop_net(ctx, mc: bool = False):
    """MLP 64-32-classes with Dropout(0.3).

    Args:
        mc: Also drop 20% of the logits at evaluation.
    """
    return DropNet(math.prod(ctx.input_shape), ctx.num_classes, mc)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugin") / "drop_net.py"
    path.write_text(DROP_NET)
    return str(path)


def dropout_config(plugin: str, mc: bool = False, **sections) -> dict:
    """A small digits run of the dropout model (one torch thread: bitwise comparable across processes)."""
    cfg = merge(digits_config(run={"rounds": 3, "eval_every": 1, "torch_threads": 1}), sections)
    return {**cfg, "plugins": [plugin], "model": {"name": "drop_net", "mc": mc}}


def final_params(run) -> torch.Tensor:
    return run.protocol.eval_params(run.ctx, run.final_state)


def test_first_job_of_a_process_draws_from_its_own_key(plugin):
    run = build(load_config(dropout_config(plugin)))
    c = run.config
    spec = WorkerSpec(run.ctx.task, run.ctx.data.x_train, run.ctx.data.y_train, c.strategy,
                      LocalHP(c.local.lr), c.seed)
    job = run.ctx.make_job(3, Payload(run.ctx.initial_params), 0, 7)
    first = Worker(spec).run(job)  # the task builds and checks its fast path inside this job
    assert run.ctx.task._fast is not None
    torch.manual_seed(123)  # and what the process did before does not matter either
    again = Worker(spec).run(job)
    assert torch.equal(first.update, again.update)


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_draws_like_serial_for_one_client_cohorts(plugin, randomness):
    # one client per round: each cohort is one job, whose masks vmap draws from that job's key
    cfg = dropout_config(plugin, protocol={"clients_per_round": 1})
    a = run_config(cfg)
    b = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cpu", "randomness": randomness}}))
    assert b.ctx.executor.unsupported is None  # it ran vectorised
    assert torch.allclose(final_params(b), final_params(a), rtol=1e-6, atol=1e-7)
    for ra, rb in zip(a.rows, b.rows):
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-6)


@pytest.mark.slow  # starts a local Ray (~10-30 s on 2 shared cores)
def test_serial_equals_ray_with_two_actors(plugin):
    pytest.importorskip("ray")
    # 4 jobs a round go to the two actors in turn: the first job of each actor process is in round 1
    cfg = dropout_config(plugin, run={"rounds": 2})
    serial = run_config(cfg)
    on_ray = run_config(merge(cfg, {"executor": {"kind": "ray", "num_actors": 2}, "ray": {"num_cpus": 2}}))
    assert len(on_ray.ctx.executor.placement) == 2
    assert strip(on_ray.rows) == strip(serial.rows)
    assert torch.equal(final_params(on_ray), final_params(serial))


def global_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def same_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2]


@pytest.mark.parametrize("executor", [{"kind": "serial"}, {"kind": "vmap", "device": "cpu", "randomness": "same"}],
                         ids=["serial", "vmap"])
def test_runs_neither_read_nor_change_the_global_generators(plugin, executor):
    cfg = dropout_config(plugin, mc=True, executor=executor)
    rows = []
    for ambient in (1, 2):
        torch.manual_seed(ambient)
        np.random.seed(ambient)
        random.seed(ambient)
        before = global_states()
        rows.append(strip(run_config(cfg).rows))
        assert same_states(global_states(), before)
    assert rows[0] == rows[1]


def test_resume_from_the_second_newest_checkpoint_equals_uninterrupted(plugin, tmp_path, tmp_yaml):
    cfg = dropout_config(plugin, mc=True, run={"rounds": 8, "checkpoint_every": 1, "keep_checkpoints": 3},
                         local={"epochs": 4})
    reference = tmp_path / "reference"
    run_config(cfg, reference)
    out = tmp_path / "run"
    proc = subprocess.Popen(fedsim_cmd("run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 300
        while len(read_jsonl(out / "metrics.jsonl")) < 6:  # rows of rounds 0-5: killed in round 6 or later
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < end
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "final_model.pt").exists(), "the run finished before it was killed"
    list_checkpoints(out)[-1].unlink()  # the newest goes: the resumed process redoes one more round
    assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))
    assert torch.equal(torch.load(out / "final_model.pt"), torch.load(reference / "final_model.pt"))


# Seeding or forking a global generator anywhere but fedsim/rng.py (`keyed_torch`) is how the
# bug these tests catch was made; draws from numpy's or Python's global generators are never keyed.
GLOBAL_RNG = re.compile(r"\bmanual_seed(_all)?\(|\bfork_rng\(|\bset_rng_state|\bnp\.random\.(seed|set_state|rand|randn|"
                        r"randint|choice|shuffle|permutation|uniform|normal)\(|^\s*(import random|from random import)",
                        re.M)


def test_only_the_rng_module_seeds_global_generators():
    offenders = []
    for package in ("fedsim", "strategies", "topologies"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "fedsim" / "rng.py":
                continue
            for m in GLOBAL_RNG.finditer(path.read_text()):
                line = path.read_text().count("\n", 0, m.start()) + 1
                text = path.read_text().splitlines()[line - 1]
                if "Generator()" not in text:  # a generator of its own
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()}")
    assert not offenders, "\n".join(offenders)
