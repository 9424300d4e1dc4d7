"""Executes docs/tutorial-strategy.md: its strategy file and config must work as the page says."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml

from fedsim.contributions import contributions
from fedsim.strategy import CombineContext

from .conftest import quadratic_config, run_config, tutorial_plugin



@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tutorial")
    return folder, tutorial_plugin("tutorial-strategy.md", folder, "my_fedexp.py")


def load_fedexp(folder):
    from fedsim.config.load import import_plugin
    from fedsim.registry import STRATEGIES

    import_plugin("my_fedexp.py", folder)
    return STRATEGIES.get("fedexp").factory


def test_tutorial_config_runs(plugin, tmp_path):
    folder, cfg = plugin
    cfg["run"] = {"rounds": 6, "eval_every": 3, "progress": False}
    (folder / "fedexp.yaml").write_text(yaml.safe_dump(cfg))
    from fedsim.config import load_config
    from fedsim.runner import execute

    run = execute(load_config(folder / "fedexp.yaml"), tmp_path / "run", progress=False)
    rows = run.rows
    assert rows[-1]["test_accuracy"] > 0.4
    assert all(r["global_lr"] >= 1.0 for r in rows[1:])


def test_fedexp_step_is_the_formula(plugin):
    fedexp = load_fedexp(plugin[0])
    s = fedexp(eps=1e-3)
    state = s.init(torch.zeros(2, dtype=torch.float64))
    u1, u2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    new = s.combine(state, contributions([u1, u2], [0.5, 0.5]), CombineContext(2, 0, 0.0))
    # Σ w‖u‖² = 1; ū = (0.5, 0.5), ‖ū‖² = 0.5 → η = max(1, 1 / (2·0.501)) = 0.998 → 1
    assert new.server_lr == 1.0
    opposite = s.combine(state, contributions([u1, -0.9 * u1], [0.5, 0.5]), CombineContext(2, 0, 0.0))
    # ū = (0.05, 0), ‖ū‖² = 0.0025; Σ w‖u‖² = 0.905 → η = 0.905 / (2·0.0035)
    assert opposite.server_lr == pytest.approx(0.905 / (2 * 0.0035))
    assert torch.allclose(opposite.params, -opposite.server_lr * torch.tensor([0.05, 0.0], dtype=torch.float64))


def test_fedexp_beats_fedavg_per_round_on_the_quadratic(plugin):
    folder, _ = plugin
    load_fedexp(folder)
    base = quadratic_config(local={"lr": 0.002, "steps": 5}, run={"rounds": 20, "eval_every": 20},
                            data={"center_std": 1.0})
    cfg = dict(base, plugins=[str(folder / "my_fedexp.py")])
    avg = run_config(base).rows[-1]["dist_to_opt"]
    exp = run_config(dict(cfg, strategy={"name": "fedexp"})).rows[-1]["dist_to_opt"]
    assert exp < 0.9 * avg, (exp, avg)


def test_behaviour_tutorial_model_restricts_dispatch(tmp_path):
    import json

    cfg = tutorial_plugin("tutorial-behaviour.md", tmp_path, "my_diurnal.py")
    cfg["run"]["progress"] = False
    (tmp_path / "diurnal.yaml").write_text(yaml.safe_dump(cfg))
    from fedsim import rng
    from fedsim.config import load_config
    from fedsim.runner import execute

    run = execute(load_config(tmp_path / "diurnal.yaml"), tmp_path / "run", progress=False)
    assert run.rows[-1]["test_accuracy"] > 0.3
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    dispatches = [e for e in events if e["kind"] == "dispatch"]
    assert 20 <= len(dispatches) <= 5 * 20  # at most 5 per round; fewer when few clients are awake
    for e in dispatches:
        offset = 24.0 * rng.uniform(cfg.get("seed", 0), "diurnal/timezone", np.array([e["client"]]))[0]
        h = (e["time"] / 1.0 + offset) % 24.0
        assert h >= 22 or h < 6, (e, h)
