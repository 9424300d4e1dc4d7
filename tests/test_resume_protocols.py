"""Kill-and-resume equality for every protocol: a run killed with SIGKILL at a random
checkpoint and resumed ends exactly like one that never stopped — same metrics.jsonl (apart
from wall time), same events.jsonl, same final model.

Each case is a small noisy quadratic run with every source of randomness on (mini-batches,
per-job jitter, availability, dropout) and a stateful strategy, so that a checkpoint that
misses anything (strategy server state, client-state store, feedback memory, in-flight jobs
and the client state they started from, pending gossip messages, the evaluation schedule)
shows up as a difference. The killed run is a subprocess of the CLI; it is killed right
after a checkpoint chosen at random among the first third of the run, while jobs are in
flight; it is resumed in this process (`fedsim resume`).
"""
from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedsim.checkpoint import CKPT_RE, list_checkpoints, load_latest
from fedsim.cli import main
from fedsim.outputs import read_jsonl

from .conftest import ROOT, fedsim_cmd, merge, quadratic_config, run_config
from .test_ray_executor import cluster  # noqa: F401 - the module's Ray cluster fixture, for the Ray cases

NOISE = {
    "data": {"num_clients": 8, "samples_per_client": 20, "noise_std": 1.0},
    "local": {"steps": 4, "batch_size": 4, "lr": 0.05},
    "system": {"compute": {"name": "linear", "slowest": 0.25, "spread": 4.0, "jitter": "exponential"},
               "availability": {"name": "bernoulli", "p_on": 0.8, "period": 0.5},
               "dropout": {"name": "bernoulli", "p": 0.1},
               "link": {"name": "constant", "bandwidth_down": 2000.0, "bandwidth_up": 500.0, "latency": 0.01}},
    "run": {"rounds": None, "eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2, "log_events": True,
            "torch_threads": 1},
}
SCAFFOLD = {"name": "scaffold"}
ECONTROL = {"name": "compressed", "inner": "fedavg", "compressor": {"name": "topk", "ratio": 0.4},
            "feedback": "econtrol"}

# name -> config changes; each runs ~30-60 evaluations (and as many checkpoints)
CASES = {
    # time-based evaluation: rows are written between rounds, at the ends the protocol reports
    "sync": {"protocol": {"name": "sync", "clients_per_round": 4, "deadline": 0.9}, "strategy": SCAFFOLD,
             "run": {"time_budget": 25.0, "eval_every_time": 0.5}},
    # its last buffer is completed after the budget (at_budget: complete)
    "async_fedbuff": {"protocol": {"name": "async", "buffer_size": 3, "concurrency": 5, "max_staleness": 4,
                                   "at_budget": "complete"},
                      "strategy": ECONTROL, "run": {"time_budget": 20.0, "eval_every": 1}},
    # DP over robust aggregation (adaptive clip, keyed noise, centered clipping's center) under attack
    "sync_dp_robust": {"protocol": {"name": "sync", "clients_per_round": 4},
                       "strategy": {"name": "dp", "clip": 2.0, "noise_multiplier": 0.5, "adaptive_quantile": 0.5,
                                    "count_noise": 1.0,
                                    "inner": {"name": "robust", "inner": {"name": "fedavg", "server_momentum": 0.5},
                                              "reducer": {"name": "centered_clip", "tau": 1.0}}},
                       "system": {"adversary": {"name": "gaussian", "sigma": 3.0, "fraction": 0.25}},
                       "run": {"time_budget": 25.0, "eval_every_time": 0.5}},
    "async_fedfix": {"protocol": {"name": "async", "window": 0.3, "concurrency": 6}, "strategy": SCAFFOLD,
                     "run": {"time_budget": 12.0, "eval_every_time": 0.4}},
    "decentralized": {"protocol": {"name": "decentralized"}, "topology": {"name": "random_matching"},
                      "strategy": {"name": "dfedavgm", "momentum": 0.5}, "run": {"rounds": 40}},
    "decentralized_choco": {"protocol": {"name": "decentralized", "compression": {
                                "gamma": 0.2, "compressor": {"name": "qsgd", "bits": 2, "bucket": 2, "contractive": True}}},
                            "topology": {"name": "ring"}, "run": {"rounds": 40}, "strategy": {"name": "dfedavg"}},
    "async_gossip": {"protocol": {"name": "async_gossip", "init": "shared", "eval_nodes": 4},
                     "topology": {"name": "random_regular", "degree": 3},
                     "strategy": {"name": "gossip"}, "run": {"time_budget": 12.0, "eval_every_time": 0.3}},
    # the VCA authors' rule: nodes train at the end of their waits, full buffers merge at once
    "async_gossip_dfl2": {"protocol": {"name": "async_gossip", "init": "shared", "eval_nodes": 4, "rule": "dfl2"},
                          "topology": {"name": "random_regular", "degree": 3},
                          "strategy": {"name": "gossip"}, "run": {"time_budget": 12.0, "eval_every_time": 0.3}},
}


def case_config(name: str, **extra) -> dict:
    """The run of case `name` (with `extra` sections merged in)."""
    return merge(merge(quadratic_config(**NOISE), CASES[name]), extra)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def newest_index(run_dir: Path) -> int:
    files = list_checkpoints(run_dir)
    return int(CKPT_RE.match(files[-1].name).group(1)) if files else 0


def run_killed_at_checkpoint(cfg_file: Path, out: Path, at: int, timeout: float = 300, extra_args=()) -> None:
    """Runs the CLI in a subprocess and SIGKILLs it as soon as checkpoint number `at` exists."""
    proc = subprocess.Popen(fedsim_cmd("run", str(cfg_file), *extra_args, "--out", str(out), "--quiet"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + timeout
        while newest_index(out) < at:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before checkpoint {at}: {proc.stderr.read()[-3000:]}")
            assert time.time() < end, f"no checkpoint {at} after {timeout} s"
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "final_model.pt").exists(), "the run finished before it was killed"


def assert_same_run(out: Path, reference: Path) -> None:
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))
    assert (out / "events.jsonl").read_text() == (reference / "events.jsonl").read_text()
    assert torch.equal(torch.load(out / "final_model.pt"), torch.load(reference / "final_model.pt"))


def assert_work_in_flight(name: str, state) -> None:
    """The checkpoint resumed from holds unfinished work of the kind the protocol has."""
    if name.startswith("async_fed"):
        assert state.flights, "no job in flight at the checkpoint"
    if name.startswith("async_gossip"):  # jobs training (or waiting to), and models in transit or received
        pending = {e[3] for e in state.queue.snapshot()["events"]}
        assert "trained" in pending and ("arrive" in pending or any(state.buffers.values())), pending


RAY = pytest.mark.slow  # a Ray cluster and actor processes for three runs: ~30-60 s a case on 2 shared cores
PAIRS = [pytest.param(name, "serial", id=f"{name}-serial") for name in sorted(CASES)] + [
    pytest.param(name, "ray", id=f"{name}-ray", marks=RAY) for name in ("sync", "async_fedbuff", "decentralized", "async_gossip")
] + [pytest.param(name, "vmap", id=f"{name}-vmap") for name in ("sync", "async_fedbuff", "decentralized")]


@pytest.mark.parametrize("name,executor", PAIRS)
def test_sigkill_then_resume_equals_uninterrupted(name, executor, tmp_path, tmp_yaml, request):
    cfg, extra_args = case_config(name), ()
    if executor == "ray":
        cluster = request.getfixturevalue("cluster")  # started for this module, stopped after it
        cfg = merge(cfg, {"executor": {"kind": "ray", "num_cpus": 1, "num_actors": 2}})
        extra_args = (f"ray.address={cluster.address}",)  # in this process, runs reuse the connected Ray
    if executor == "vmap":  # resumed in-flight jobs form other cohorts than in the reference run
        cfg = merge(cfg, {"executor": {"kind": "vmap", "device": "cpu"}})
        if name == "async_fedbuff":  # the compressed strategy is not vectorisable: vmap would run it serially
            cfg["strategy"] = dict(SCAFFOLD)
    reference = tmp_path / "reference"
    run_config(cfg, reference)
    evaluations = len(read_jsonl(reference / "metrics.jsonl"))
    assert evaluations >= 20, evaluations
    # checkpoint 1 is the initial state, 2 comes before the first gossip messages; leave time to kill
    at = random.randint(3, evaluations // 3)
    out = tmp_path / "run"
    run_killed_at_checkpoint(tmp_yaml(cfg), out, at, extra_args=extra_args)
    state = load_latest(out)[0]["protocol_state"]
    assert_work_in_flight(name, state)
    assert main(["resume", str(out), "--quiet"]) == 0, f"killed after checkpoint {at}"
    assert_same_run(out, reference)
