"""A client whose training code raises: 'stop' names it with the original traceback,
'drop' treats it as a client that dropped out (serial executor; Ray: test_ray_executor.py)."""
from __future__ import annotations

import json

import pytest

from fedsim.errors import ClientJobError

from .conftest import digits_config, run_config

FAULTS = "tests.ray_faults"


def faulty(**executor):
    return digits_config(strategy=f"{FAULTS}:fedavg_raises", executor={"kind": "serial", **executor},
                         run={"rounds": 3, "eval_every": 1, "log_events": True})


def test_stop_names_the_client_and_shows_the_original_error():
    with pytest.raises(ClientJobError) as info:
        run_config(faulty())
    text = str(info.value)
    assert text.startswith(f"client {info.value.client} (job {info.value.job_id}) failed in its local update")
    assert "Traceback" in text and "ray_faults.py" in text and "ValueError: boom" in text


def test_drop_treats_the_failing_clients_as_dropped(tmp_path):
    run = run_config(faulty(on_client_error="drop"), tmp_path)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    drops = [e for e in events if e["kind"] == "drop"]
    arrivals = [e for e in events if e["kind"] == "arrival"]
    assert drops and arrivals  # some clients have an odd number of steps, some an even one
    assert run.rows[-1]["dropped"] == len(drops)
    assert sum(r["participants"] for r in run.rows[1:]) == len(arrivals)
    assert run.rows[-1]["test_accuracy"] > run.rows[0]["test_accuracy"]  # the others still train


def test_drop_is_refused_by_a_protocol_that_cannot_drop(monkeypatch):
    from fedsim.errors import ConfigError
    from fedsim.protocols.sync import SyncProtocol

    monkeypatch.setattr(SyncProtocol, "drops_failed_jobs", False)
    with pytest.raises(ConfigError, match="executor.on_client_error: protocol 'sync' cannot drop"):
        run_config(faulty(on_client_error="drop"))


def test_async_drops_a_failing_client_when_its_job_ends(tmp_path):
    cfg = {**faulty(on_client_error="drop"), "protocol": {"name": "async", "concurrency": 4, "buffer_size": 2},
           "run": {"rounds": 10, "eval_every": 2, "log_events": True, "progress": False}}
    run = run_config(cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    drops = [e for e in events if e["kind"] == "drop"]
    assert drops and any(e["kind"] == "arrival" for e in events)
    assert run.rows[-1]["dropped"] == len(drops)
    assert sum(r["updates"] for r in run.rows) == sum(e["kind"] == "arrival" for e in events)
