"""Runs that could never end are refused at set-up or stopped with one line (fedsim.stall).

Every case runs the real CLI in a subprocess with a timeout, so a regression fails here
instead of hanging the suite.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from fedsim.checkpoint import list_checkpoints

from .conftest import fedsim_cmd, merge, quadratic_config

PROTOCOLS = {
    "sync": {},
    "async": {"protocol": {"name": "async"}},
    "decentralized": {"protocol": "decentralized", "strategy": "dfedavg"},
    "async_gossip": {"protocol": {"name": "async_gossip", "init": "shared"}, "strategy": "gossip"},
}
TIME_ONLY = {"run": {"rounds": None, "time_budget": 10.0}}


def cli(tmp_path: Path, cfg: dict, *args: str, timeout: float = 60) -> tuple[int, str, Path]:
    """Runs `fedsim run` on `cfg` into tmp_path/run; returns (exit status, stderr, run folder)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = subprocess.run(fedsim_cmd("run", str(path), "--out", str(out), "--quiet", *args),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, out


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_jobs_of_zero_duration_with_a_time_budget_are_refused(protocol, tmp_path):
    cfg = merge(quadratic_config(system={"compute": {"name": "constant", "step_time": 0}}, **TIME_ONLY),
                PROTOCOLS[protocol])
    code, err, out = cli(tmp_path, cfg)
    assert code == 2
    assert one_line(err).startswith("fedsim: error: system.compute: every job takes 0 virtual seconds")
    assert not out.exists()


def test_fedfix_windows_move_the_clock_of_zero_duration_jobs(tmp_path):
    from .conftest import run_config

    cfg = quadratic_config(system={"compute": {"name": "constant", "step_time": 0}},
                           protocol={"name": "async", "window": 0.5}, **TIME_ONLY)
    run = run_config(cfg)
    assert run.rows[-1]["virtual_time"] == 10.0 and run.final_state.rounds == 20


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_jobs_shorter_than_a_tick_stop_with_no_progress(protocol, tmp_path):
    # 1e-15 s per step rounds to 0 ticks: set-up cannot prove it, the run-time watch stops it
    cfg = merge(quadratic_config(system={"compute": {"name": "constant", "step_time": 1e-15}}, **TIME_ONLY),
                PROTOCOLS[protocol])
    code, err, out = cli(tmp_path, merge(cfg, {"run": {"stall_jobs_per_client": 20}}))
    assert code == 4, err
    line = one_line(err)
    assert "no progress: 200 jobs started since round 0 at virtual time 0 s without moving the virtual clock" in line
    assert "run.stall_jobs_per_client=20" in line and f"checkpoint written in {out}" in line
    assert list_checkpoints(out)


@pytest.mark.parametrize("protocol", ["async", "async_gossip"])
def test_every_job_lost_stops_with_no_progress(protocol, tmp_path):
    cfg = merge(quadratic_config(system={"dropout": {"name": "bernoulli", "p": 1.0}}), PROTOCOLS[protocol])
    code, err, out = cli(tmp_path, cfg)  # default run.stall_jobs_per_client: 100 × 10 clients
    assert code == 4, err
    assert "no progress: 1000 jobs started since round 0" in one_line(err)
    assert "without completing a round" in err and list_checkpoints(out)


NEVER_BACK = {"availability": {"name": "markov", "p_on_off": 1.0, "p_off_on": 1e-12, "period": 1.0}}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_no_client_ever_available_stops_after_max_idle_time(protocol, tmp_path):
    cfg = merge(quadratic_config(system=NEVER_BACK, run={"max_idle_time": 300}), PROTOCOLS[protocol])
    code, err, out = cli(tmp_path, cfg)
    assert code == 4, err
    assert "no progress: no job started and no round completed from virtual time 0 s to 300 s" in one_line(err)
    assert "is no client available any more? (run.max_idle_time=300 s)" in err and list_checkpoints(out)


def test_a_resumed_stalled_run_stops_where_it_stopped(tmp_path):
    cfg = merge(quadratic_config(system={"dropout": {"name": "bernoulli", "p": 1.0}}), PROTOCOLS["async"])
    code, err, out = cli(tmp_path, merge(cfg, {"run": {"stall_jobs_per_client": 5}}))
    assert code == 4
    proc = subprocess.run(fedsim_cmd("resume", str(out), "--quiet"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4 and one_line(proc.stderr) == err.strip()


def test_frequent_losses_and_waits_are_not_stalls(tmp_path):
    from .conftest import run_config

    system = {"dropout": {"name": "bernoulli", "p": 0.9},
              "availability": {"name": "bernoulli", "p_on": 0.05, "period": 100.0}}
    for protocol in ("async", "sync"):
        run = run_config(merge(quadratic_config(system=system, run={"rounds": 20}), PROTOCOLS[protocol]))
        assert run.final_state.rounds == 20


def test_a_time_budget_shorter_than_any_job_is_refused(tmp_path):
    cfg = quadratic_config(system={"compute": {"name": "constant", "step_time": 0.5}}, **TIME_ONLY)
    code, err, out = cli(tmp_path, merge(cfg, {"run": {"time_budget": 4.9}}))  # 10 steps of 0.5 s: 5 s
    assert code == 2 and not out.exists()
    assert one_line(err) == ("fedsim: error: run.time_budget: 4.9 s ends before any client can finish its first "
                             "job's local steps (the fastest takes 5 s): nothing would be trained")


def test_a_time_budget_that_ends_before_the_first_round_warns(tmp_path):
    # the steps fit (5 s), the transfers (2 × 1 s latency) do not: known only when the run ends
    cfg = quadratic_config(system={"compute": {"name": "constant", "step_time": 0.5},
                                   "link": {"name": "constant", "latency": 1.0}}, **TIME_ONLY)
    code, err, out = cli(tmp_path, merge(cfg, {"run": {"time_budget": 6.0}}))
    assert code == 0
    assert one_line(err) == ("fedsim: warning: the run ended at virtual time 0 s (run.time_budget=6 s) before its "
                             "first round completed: nothing was aggregated")


def _idx(path: Path, dims: tuple[int, ...]) -> None:
    path.write_bytes(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))


def test_a_dataset_without_samples_is_refused(tmp_path):
    for name, dims in [("train-images-idx3-ubyte", (0, 28, 28)), ("train-labels-idx1-ubyte", (0,)),
                       ("t10k-images-idx3-ubyte", (0, 28, 28)), ("t10k-labels-idx1-ubyte", (0,))]:
        _idx(tmp_path / name, dims)
    cfg = {"data": {"name": "mnist", "root": str(tmp_path), "num_clients": 2, "partition": "iid"},
           "model": {"name": "logreg"}, "run": {"rounds": 2, "progress": False}}
    code, err, out = cli(tmp_path, cfg)
    assert code == 2 and not out.exists()
    assert one_line(err) == "fedsim: error: data source 'mnist' has 0 training samples"
    code, err, out = cli(tmp_path, {"data": {"name": "digits", "test_fraction": 0}, "run": {"rounds": 2}})
    assert code == 2 and not out.exists()
    assert one_line(err) == "fedsim: error: data.test_fraction: 0 leaves data source 'digits' with no test samples"
