"""Run folders: fedsim deletes only folders it created (they hold its marker), one process
writes a run folder at a time (a lock the OS releases when the process dies), a killed run's
temporary files are cleaned at the next resume, and failed writes (full disk, read-only
folder, an unwritable `run.state_dir`, a second Ctrl-C) end in one line that keeps every
checkpoint and says how to resume."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedsim.checkpoint import list_checkpoints
from fedsim.cli import main
from fedsim.outputs import LOCK, MARKER, read_jsonl

from .conftest import ROOT, fedsim_cmd, merge, quadratic_config, run_config

SMALL = quadratic_config(run={"rounds": 6, "eval_every": 1, "checkpoint_every": 1, "log_events": True})
# a run that is paused, killed or interrupted after its first checkpoint (~0.05 s a round)
LONG = quadratic_config(run={"rounds": 4000, "eval_every": 1, "checkpoint_every": 5, "log_events": True,
                             "torch_threads": 1})


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def user_folder(path: Path) -> dict[str, str]:
    """A folder of someone's files (one in a sub-folder); returns its content."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "paper.tex").write_text("months of work")
    (path / "data.csv").write_text("1,2,3")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


# -- fedsim deletes only its own run folders ---------------------------------------------------

def test_overwrite_refuses_a_folder_fedsim_did_not_create(tmp_path, tmp_yaml, capsys):
    out = tmp_path / "mine"
    before = user_folder(out)
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--overwrite", "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{out} is not a run folder fedsim created" in line and "delete it yourself" in line
    assert snapshot(out) == before


def test_resume_flag_refuses_a_folder_with_a_config_but_no_checkpoint_that_fedsim_did_not_create(tmp_path, tmp_yaml,
                                                                                                     capsys):
    out = tmp_path / "mine"
    user_folder(out)
    (out / "config.yaml").write_text("name: not a run\n")
    before = snapshot(out)
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "is not a run folder fedsim created" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tmp_path, tmp_yaml, capsys):
    out = tmp_path / "file.txt"
    out.write_text("keep")
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    assert out.read_text() == "keep"


def test_overwrite_and_resume_flag_replace_fedsims_own_run_folder(tmp_path, tmp_yaml):
    cfg = tmp_yaml(SMALL)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert (out / MARKER).is_file()
    (out / "leftover.txt").write_text("x")
    assert main(["run", str(cfg), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "leftover.txt").exists() and (out / MARKER).is_file()
    shutil.rmtree(out / "checkpoints")  # a run folder whose run wrote no checkpoint yet: --resume starts over
    (out / "leftover.txt").write_text("x")
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--quiet"]) == 0
    assert not (out / "leftover.txt").exists() and list_checkpoints(out)


def test_run_folder_from_before_the_marker_is_resumed_but_never_deleted(tmp_path, tmp_yaml, capsys):
    cfg = tmp_yaml(SMALL)
    out = tmp_path / "run"
    run_config(merge(SMALL, {"run": {"rounds": 4}}), out)
    for name in (MARKER, LOCK, "final_model.pt"):
        (out / name).unlink()
    assert main(["resume", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert "is not a run folder fedsim created" in one_line(capsys.readouterr().err)
    assert (out / "final_model.pt").is_file()


# -- one writer per run folder -------------------------------------------------------------------

def start_run(cfg_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(fedsim_cmd(*extra, "--out", str(out), "--quiet") if extra[0] == "run" else
                            fedsim_cmd(*extra, "--quiet"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def test_a_second_writer_is_refused_while_a_run_writes_the_folder(tmp_path, tmp_yaml):
    cfg = merge(LONG, {"run": {"rounds": 50}})
    cfg_file = tmp_yaml(cfg)
    out = tmp_path / "run"
    first = start_run(cfg_file, out, "run", str(cfg_file))
    try:
        wait_for(lambda: list_checkpoints(out), first)
        first.send_signal(signal.SIGSTOP)  # holds the lock, paused: the other writers come now
        for args in (["resume", str(out)], ["run", str(cfg_file), "--out", str(out), "--overwrite"]):
            other = subprocess.run(fedsim_cmd(*args, "--quiet"), cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert other.returncode == 2, other.stderr
            line = one_line(other.stderr)
            assert f"run folder {out} is in use by another fedsim process (pid {first.pid})" in line
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    reference = run_config(cfg, tmp_path / "reference")
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(reference.rows)
    assert (out / "events.jsonl").read_text() == (tmp_path / "reference" / "events.jsonl").read_text()


def test_killed_runs_lock_is_released_and_its_temporary_files_are_cleaned_at_resume(tmp_path, tmp_yaml):
    cfg = merge(LONG, {"run": {"rounds": 60}})
    cfg_file = tmp_yaml(cfg)
    out = tmp_path / "run"
    proc = start_run(cfg_file, out, "run", str(cfg_file))
    try:
        wait_for(lambda: list_checkpoints(out), proc)
    finally:
        proc.kill()
        proc.wait()
    assert (out / LOCK).is_file()  # the file stays; the lock died with the process
    ckpts = out / "checkpoints"
    leftovers = [ckpts / ".ckpt-000000009.pt.abc123.tmp", ckpts / ".store-000000009.tmp", ckpts / "store-000000009",
                 out / ".summary.json.x1y2z3", out / ".metrics.jsonl.q8w9e0", out / ".final_model.pt.r4t5.tmp",
                 out / "client-state-k2j3h4"]
    for path in leftovers:
        if path.name.startswith((".store", "store", "client")):
            path.mkdir()
            (path / "states-0.bin").write_bytes(b"\0" * 8)
        else:
            path.write_bytes(b"partial")
    (out / "notes.txt").write_text("the user's own file in the run folder")
    assert main(["resume", str(out), "--quiet"]) == 0
    assert not [p for p in leftovers if p.exists()]
    assert (out / "notes.txt").read_text() == "the user's own file in the run folder"
    reference = run_config(cfg, tmp_path / "reference")
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(reference.rows)


# -- failed writes end in one line; checkpoints are kept -----------------------------------------

def test_torch_save_failing_on_a_full_disk_is_one_line_with_the_resume_command(tmp_path, tmp_yaml, capsys, monkeypatch):
    import fedsim.checkpoint as ckpt

    reference = run_config(SMALL).rows
    real_save, calls = torch.save, []

    def disk_fills(obj, f, *args, **kwargs):  # what torch.save raises when the disk is full
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", disk_fills)
    out = tmp_path / "run"
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("fedsim: error: cannot write the run folder: ") and "inline_container" in line
    assert line.endswith(f"resume with: fedsim resume {out}")
    assert not list((out / "checkpoints").glob(".*"))  # no temporary file left
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(reference)


def test_full_disk_at_config_yaml_is_one_line_and_leaves_no_folder(tmp_path, tmp_yaml, capsys, monkeypatch):
    import fedsim.outputs

    def full(fd, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fedsim.outputs.os, "fsync", full)
    out = tmp_path / "run"
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--quiet"]) == 2
    assert one_line(capsys.readouterr().err) == "fedsim: error: a write failed: [Errno 28] No space left on device"
    assert not out.exists()


def test_unwritable_state_dir_names_the_key_and_leaves_nothing(tmp_path, tmp_yaml, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = merge(SMALL, {"strategy": {"name": "scaffold"}, "run": {"state_memory_mb": 0,
                                                                  "state_dir": str(blocker / "states")}})
    out = tmp_path / "run"
    assert main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"fedsim: error: run.state_dir: cannot write to {blocker / 'states'}"), line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cfg.yaml"]
    # a state_dir that does not exist yet is fine, and the check leaves no folder behind
    cfg["run"]["state_dir"] = str(tmp_path / "new" / "states")
    from fedsim.config import load_config
    from fedsim.runner import build

    build(load_config(cfg)).ctx.executor.close()
    assert not (tmp_path / "new").exists()


def test_second_ctrl_c_is_one_line_with_the_resume_command(tmp_path, tmp_yaml):
    cfg_file = tmp_yaml(LONG)
    out = tmp_path / "run"
    proc = start_run(cfg_file, out, "run", str(cfg_file))
    try:
        wait_for(lambda: list_checkpoints(out), proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)  # not at once: two pending SIGINTs are one
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    line = one_line(err)
    assert line.endswith(f"resume with: fedsim resume {out}"), line
    import warnings

    from fedsim.checkpoint import load_latest

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_latest(out)  # the newest checkpoint is whole


def test_second_ctrl_c_inside_the_run_is_one_line_with_the_resume_command(tmp_path, tmp_yaml, capsys, monkeypatch):
    from fedsim.protocols.sync import SyncProtocol

    step = SyncProtocol.step

    def second_ctrl_c(self, ctx, state):  # what the handler of a second SIGINT raises, wherever the run is
        if state.rounds == 4:
            raise KeyboardInterrupt
        return step(self, ctx, state)

    monkeypatch.setattr(SyncProtocol, "step", second_ctrl_c)
    out = tmp_path / "run"
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(out), "--quiet"]) == 130
    assert one_line(capsys.readouterr().err) == ("fedsim: error: stopped at once by a second interrupt; its newest "
                                                 f"checkpoint is kept, resume with: fedsim resume {out}")
    monkeypatch.setattr(SyncProtocol, "step", step)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(run_config(SMALL).rows)


def mounted_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "192k"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield disk
    finally:  # lazily if a failed test still holds a file there
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_really_full_disk_is_one_line_and_the_run_resumes_elsewhere(small_disk, tmp_path, tmp_yaml, capsys):
    # each checkpoint holds the 20k-parameter model (80 kB): the third one does not fit
    cfg = quadratic_config(data={"dim": 20000}, run={"rounds": 8, "eval_every": 1, "checkpoint_every": 1})
    reference = run_config(cfg).rows
    out = small_disk / "run"
    assert main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "[Errno 28] No space left on device" in line and line.endswith(f"resume with: fedsim resume {out}"), line
    assert not [p for p in out.rglob(".*") if p.name not in (MARKER, LOCK)]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert main(["resume", str(moved), "--quiet"]) == 0
    assert strip(read_jsonl(moved / "metrics.jsonl")) == strip(reference)


def test_read_only_folder_is_one_line(small_disk, tmp_path, tmp_yaml, capsys):
    done = small_disk / "done"
    run_config(merge(SMALL, {"run": {"rounds": 2}}), done)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["run", str(tmp_yaml(SMALL)), "--out", str(small_disk / "new"), "--quiet"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"fedsim: error: cannot create the run folder {small_disk / 'new'}: Read-only file system")
    assert main(["resume", str(done), "--quiet"]) == 2
    assert one_line(capsys.readouterr().err) == f"fedsim: error: cannot write the run folder {done}: Read-only file system"
