"""Checkpoints and resume: a killed run, resumed, ends exactly like one that never stopped."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedsim.checkpoint import decode, encode, list_checkpoints
from fedsim.cli import main
from fedsim.outputs import read_jsonl

from .conftest import ROOT, digits_config, fedsim_cmd, merge, run_config

SLOW_ENOUGH = {"run": {"rounds": 40, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 3, "torch_threads": 1},
               "local": {"epochs": 2}}


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if list_checkpoints(run_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the config the kill tests use."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_config(merge(digits_config(), SLOW_ENOUGH), out)
    return out


def test_encode_decode_roundtrip():
    from fedsim.blocks import ServerState
    from fedsim.clock import EventQueue
    from fedsim.protocols.sync import SyncState

    q = EventQueue()
    q.push(5, "arrival", client=3)
    state = SyncState(rounds=2, server=ServerState(torch.arange(3.0), ()), version=2, train_loss=0.5)
    tree = encode({"s": state, "q": q, "ids": {1: torch.ones(2)}, "t": (1, "a")})
    back = decode(tree)
    assert back["s"].rounds == 2 and torch.equal(back["s"].server.params, torch.arange(3.0))
    assert back["q"].pop().data == {"client": 3}
    assert torch.equal(back["ids"][1], torch.ones(2)) and back["t"] == (1, "a")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tmp_yaml, reference):
    cfg = tmp_yaml(merge(digits_config(), SLOW_ENOUGH))
    out = tmp_path / "run"
    proc = subprocess.Popen(fedsim_cmd("run", str(cfg), "--out", str(out), "--quiet"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out, proc)
    time.sleep(random.uniform(0.0, 0.4))
    proc.kill()
    proc.wait()
    resumed = subprocess.run(fedsim_cmd("resume", str(out), "--quiet"), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))
    assert torch.equal(torch.load(out / "final_model.pt"), torch.load(reference / "final_model.pt"))


def test_sigint_writes_checkpoint_and_hint(tmp_path, tmp_yaml, reference):
    cfg = tmp_yaml(merge(digits_config(), merge(SLOW_ENOUGH, {"run": {"checkpoint_every": 0}})))
    out = tmp_path / "run"
    proc = subprocess.Popen(fedsim_cmd("run", str(cfg), "--out", str(out), "--quiet"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_jsonl(out / "metrics.jsonl")) < 3:
        assert time.time() < end and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"fedsim resume {out}" in err and "Traceback" not in err
    assert len(list_checkpoints(out)) == 1
    assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))


def test_corrupt_checkpoint_falls_back_with_warning(tmp_path, reference):
    out = tmp_path / "run"
    cfg = merge(digits_config(), merge(SLOW_ENOUGH, {"run": {"rounds": 12}}))
    run_config(cfg, out)
    files = list_checkpoints(out)
    assert len(files) == 3
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # truncated newest
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"round": 99, "virt')
    with pytest.warns(UserWarning, match="unreadable"):
        assert main(["resume", str(out), "--quiet"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(0, 13, 2))


def test_a_file_that_is_not_a_checkpoint_is_skipped_with_warning(tmp_path):
    from .conftest import quadratic_config

    out = tmp_path / "run"
    run_config(quadratic_config(run={"rounds": 6, "eval_every": 2, "checkpoint_every": 1}), out)
    rows = read_jsonl(out / "metrics.jsonl")
    torch.save(encode({"format": 1}), out / "checkpoints" / "ckpt-000000099.pt")  # loadable, not a checkpoint
    with pytest.warns(UserWarning, match="ckpt-000000099.pt is unreadable .*not a fedsim checkpoint"):
        assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(rows)


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tmp_yaml, capsys, monkeypatch):
    import errno

    from fedsim import checkpoint

    from .conftest import quadratic_config

    cfg = quadratic_config(run={"rounds": 8, "eval_every": 1, "checkpoint_every": 1})
    reference = run_config(cfg).rows
    save, calls = checkpoint.save, []

    def fills_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", fills_the_disk)
    out = tmp_path / "run"
    assert main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsim: error: cannot write the run folder: [Errno 28] No space left on device")
    assert f"resume with: fedsim resume {out}" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(checkpoint, "save", save)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(reference)


def test_resume_refuses_a_changed_model(tmp_path, capsys):
    out = tmp_path / "run"
    run_config(merge(digits_config(), {"run": {"rounds": 4, "checkpoint_every": 1}}), out)
    text = (out / "config.yaml").read_text().replace("- 32", "- 48")
    (out / "config.yaml").write_text(text)
    assert main(["resume", str(out), "--quiet"]) == 2
    assert "parameters" in capsys.readouterr().err


def test_run_resume_flag_and_out_refusal(tmp_path, tmp_yaml, capsys):
    cfg = tmp_yaml(merge(digits_config(), {"run": {"rounds": 4, "checkpoint_every": 1}}))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out


DIVERGING = {
    "sync": {},
    "async": {"protocol": {"name": "async", "buffer_size": 2}},
    "decentralized": {"protocol": "decentralized", "strategy": "dfedavg"},
    "async_gossip": {"protocol": {"name": "async_gossip", "init": "shared"}, "strategy": "gossip",
                     "topology": "complete"},
}


@pytest.mark.parametrize("protocol", sorted(DIVERGING))
def test_divergence_exits_3_with_round_client_and_last_metrics(protocol, tmp_path, tmp_yaml, capsys):
    from .conftest import quadratic_config

    # evaluated only at the start: the updates overflow before any evaluation sees the loss grow
    # (the loss rules stop a run too: tests/test_divergence.py)
    cfg = merge(quadratic_config(local={"lr": 1.0}, run={"rounds": 400, "eval_every": 400, "checkpoint_every": 1}),
                DIVERGING[protocol])
    out = tmp_path / "run"
    code = main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "NaN/inf" in err and "client" in err and "round" in err and "last finite metrics" in err
    last = err.split("last finite metrics: ")[1]
    assert "'test_loss': inf" not in last and "'test_loss': None" not in last, last
    assert "last checkpoint kept" in err and list_checkpoints(out)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
