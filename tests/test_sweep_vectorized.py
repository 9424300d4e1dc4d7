"""`fedsim sweep --vectorize`: the seeds of a combination share one vmap call per round, and each
run folder equals a single run of that seed (to float rounding); interrupted vectorised sweeps
resume; runs that cannot share calls run separately after one line saying why."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fedsim import sweep_vectorized
from fedsim.errors import Interrupted
from fedsim.config import load_config
from fedsim.sweep import is_finished, sweep
from fedsim.runner import build, drive
from fedsim.sweep_vectorized import run_together, why_not

from .conftest import quadratic_config, run_config
from .test_sweep import read_rows

SEEDS = [0, 1, 2]


def vmap_config(**run) -> dict:
    return quadratic_config(executor={"kind": "vmap", "device": "cpu"},
                            run={"rounds": 6, "eval_every": 2, "checkpoint_every": 1, **run})


def assert_rows_close(got: list[dict], want: list[dict], exact: bool = False) -> None:
    """The metrics rows are equal (floats to rounding, unless `exact`), wall times apart."""
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want):
        for k in g:
            if isinstance(w[k], float) and k != "wall_time" and not exact:
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (k, g, w)
            elif k != "wall_time":
                assert g[k] == w[k], (k, g, w)


def assert_single_run(folder: Path, cfg: dict, seed: int, exact: bool = False) -> torch.Tensor:
    """`folder` holds the rows and final model of a single run of `cfg` with `seed` (wall times
    apart), equal to float rounding or, with `exact`, bit for bit. Returns the final model."""
    assert is_finished(folder)
    single = run_config(cfg, None, overrides=(f"seed={seed}",))
    assert_rows_close(read_rows(folder / "metrics.jsonl"), json.loads(json.dumps(single.rows)), exact)
    model = single.protocol.eval_params(single.ctx, single.final_state)
    saved = torch.load(folder / "final_model.pt")
    if exact:
        assert torch.equal(saved, model)
    else:
        torch.testing.assert_close(saved, model, rtol=1e-5, atol=1e-6)
    return model


@pytest.fixture
def shared_calls(monkeypatch):
    """Records, for every shared vmap call, how many runs' jobs it held."""
    calls: list[int] = []
    original = sweep_vectorized.SharedVmap._run_shared

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", counted)
    return calls


def test_vectorised_seeds_equal_separate_runs(tmp_path, shared_calls):
    cfg = vmap_config()
    lines: list[str] = []
    rows = sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert not any("separately" in line for line in lines), lines
    assert shared_calls == [3] * 6  # every round of the three runs was one call
    models = [assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed) for seed in SEEDS]
    fresh = tmp_path / "fresh"  # the same files as a single run's folder, the same config.yaml
    run_config(cfg, fresh, overrides=("seed=2",))
    folder = tmp_path / "s" / "seed=2"
    assert (folder / "config.yaml").read_text() == (fresh / "config.yaml").read_text()
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == sorted(p.relative_to(fresh) for p in fresh.rglob("*"))
    assert not torch.equal(models[0], models[1])  # the seeds gave different runs


def test_an_interrupted_vectorised_sweep_resumes_to_the_single_runs(tmp_path, shared_calls, monkeypatch):
    cfg = vmap_config(rounds=8)
    original = sweep_vectorized.SharedVmap._run_shared  # counted by `shared_calls`

    def ctrl_c_midway(self, batch):  # Ctrl-C arrives during the 3rd round
        original(self, batch)
        if len(shared_calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            while self.stop_signal is None:  # the main thread's handler takes it
                time.sleep(0.01)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", ctrl_c_midway)
    with pytest.raises(Interrupted, match="sweep stopped by SIGINT"):
        sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lambda _: None, vectorize=True)
    folders = [tmp_path / "s" / f"seed={s}" for s in SEEDS]
    assert not any(is_finished(f) for f in folders)
    assert all(list((f / "checkpoints").iterdir()) for f in folders)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", original)
    rows = sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lambda _: None, vectorize=True)
    assert [(r["status"], r["how"]) for r in rows] == [("done", "resumed")] * 3
    assert set(shared_calls) == {3}  # resumed together too
    for seed, folder in zip(SEEDS, folders):
        assert_single_run(folder, cfg, seed)


def test_runs_that_cannot_share_calls_run_separately_with_one_line(tmp_path, shared_calls):
    # seed s has 3 + s input features: the runs' models differ in size once built
    cfg = {"seed": 0, "data": {"name": "tests.tiny_sources:seeded_width", "num_clients": 3, "partition": "iid"},
           "model": {"name": "mlp", "hidden": [4]}, "local": {"lr": 0.05, "batch_size": 8, "steps": 2},
           "protocol": {"name": "sync"}, "executor": {"kind": "vmap", "device": "cpu"},
           "run": {"rounds": 3, "eval_every": 1, "progress": False}}
    lines: list[str] = []
    rows = sweep(cfg, [], [0, 1], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 2
    said = [line for line in lines if "separately" in line]
    assert said == ["sweep: running these 2 runs separately: their models differ in size (21 vs 25 parameters)"]
    assert shared_calls == []
    for seed in (0, 1):
        assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed, exact=True)

    # what is known from the configs is said before anything runs
    quad = vmap_config()
    assert why_not([load_config(quad, [f"seed={s}"]) for s in (0, 1)]) is None
    serial = {**quad, "executor": {"kind": "serial"}}
    assert why_not([load_config(serial, [f"seed={s}"]) for s in (0, 1)]) == "executor.kind is 'serial', not 'vmap'"
    assert why_not([load_config(quad, ["seed=0"]), load_config(quad, ["seed=1", "local.lr=0.1"])]) == \
        "the runs differ in more than their seed"


def test_asynchronous_runs_share_calls_too(shared_calls):
    # each run hands in the jobs it dispatched whenever it needs a result it does not have
    cfg = quadratic_config(executor={"kind": "vmap", "device": "cpu"}, strategy={"name": "fedasync"},
                           protocol={"name": "async", "concurrency": 4}, run={"rounds": 12, "eval_every": 4})
    configs = [load_config(cfg, [f"seed={s}"]) for s in SEEDS]
    assert why_not(configs) is None
    rows, stopped = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert stopped is None and shared_calls and set(shared_calls) == {3}
    for seed, got in zip(SEEDS, rows):
        assert_rows_close(got, run_config(cfg, None, overrides=(f"seed={seed}",)).rows)


EVAL_NOISE_NET = """
from torch import nn

from fedsim.registry import MODELS


class EvalNoiseNet(nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))

    def forward(self, x):  # dropout at evaluation only: the driver draws from torch's global generator
        return nn.functional.dropout(self.body(x), 0.5, training=not self.training)


@MODELS.register("eval_noise_net")
def eval_noise_net(ctx):
    \"\"\"A linear model whose evaluation drops half the outputs.\"\"\"
    import math

    return EvalNoiseNet(math.prod(ctx.input_shape), ctx.num_classes)
"""


def test_each_run_draws_from_its_own_generators(tmp_path, shared_calls):
    # the runs take turns, each with the global generator states it would have alone
    (tmp_path / "eval_noise_net.py").write_text(EVAL_NOISE_NET)
    cfg = {"data": {"name": "tests.tiny_sources:regression", "num_clients": 4, "partition": "iid"},
           "plugins": [str(tmp_path / "eval_noise_net.py")], "model": {"name": "eval_noise_net"},
           "local": {"lr": 0.05, "batch_size": 8, "steps": 2}, "protocol": {"name": "sync", "clients_per_round": 2},
           "executor": {"kind": "vmap", "device": "cpu"}, "run": {"rounds": 4, "eval_every": 1, "progress": False}}
    configs = [load_config(cfg, [f"seed={s}"]) for s in SEEDS]
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert set(shared_calls) == {3}
    for seed, got in zip(SEEDS, rows):
        assert_rows_close(got, run_config(cfg, None, overrides=(f"seed={seed}",)).rows)
