"""Start-up cost of a short run: what a run imports, and the pieces that keep it small
(lazy registry lookups, the dynamo-free gradient transform, the cross-entropy form)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.executors import light_grad
from fedsim.registry import STRATEGIES
from fedsim.strategy import Batch
from fedsim.task import Task

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_lookup_imports_only_the_module_named_like_the_component():
    res = _python(
        "import json, sys\n"
        "from fedsim.registry import STRATEGIES, PROTOCOLS, EXECUTORS\n"
        "STRATEGIES.get('fedavg'); PROTOCOLS.get('sync'); EXECUTORS.get('vmap')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('networkx', 'scipy', 'ray', 'flwr') or m.startswith(('fedsim.strategies', 'fedsim.protocols.')))))"
    )
    assert "fedsim.strategies.fedavg" in res and "fedsim.protocols.sync" in res
    assert not any(m.split(".")[0] in ("networkx", "scipy", "ray", "flwr") for m in res), res
    assert "fedsim.strategies.fedopt" not in res and "fedsim.protocols.decentralized" not in res


def test_names_registered_in_another_file_and_unknown_names_still_resolve():
    assert STRATEGIES.get("fedadam").factory.__module__ == "fedsim.strategies.fedopt"
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'fedyogi'") as err:
        STRATEGIES.get("fedyogy", "strategy.name")
    assert "scaffold" in str(err.value)  # every built-in name is listed


def test_a_short_vmap_run_imports_neither_dynamo_nor_sympy_nor_networkx(tmp_path):
    """A 3-round vmap run on the CPU: its start-up leaves out torch._dynamo (1 s with
    teardown), sympy (0.35 s) and networkx/scipy (0.3 s); its result equals the serial run's."""
    code = (
        "import json, sys\n"
        "from fedsim.config import load_config\n"
        "from fedsim.runner import build, drive\n"
        "accs = {}\n"
        "for kind in ('vmap', 'serial'):\n"
        "    cfg = {'name': 't', 'seed': 3, 'data': {'name': 'gaussian_mixture', 'num_samples': 600, 'dim': 12,\n"
        "           'num_clients': 6}, 'model': {'name': 'mlp', 'hidden': [16]}, 'strategy': {'name': 'fedavg'},\n"
        "           'local': {'lr': 0.1, 'batch_size': 8, 'epochs': 1}, 'protocol': {'name': 'sync'},\n"
        "           'executor': {'kind': kind, **({'device': 'cpu'} if kind == 'vmap' else {})},\n"
        "           'run': {'rounds': 3, 'eval_every': 3, 'progress': False}}\n"
        "    accs[kind] = drive(build(load_config(cfg)), None, progress=False)[-1]['test_loss']\n"
        "    if kind == 'vmap':\n"
        "        loaded = sorted(m for m in ('torch._dynamo', 'sympy', 'networkx', 'scipy') if m in sys.modules)\n"
        "print(json.dumps({'loaded': loaded, **accs}))"
    )
    res = _python(code)
    assert res["loaded"] == []
    assert res["vmap"] == pytest.approx(res["serial"], rel=1e-6)


def _mlp_task() -> Task:
    torch.manual_seed(0)
    return Task(torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5)), "classification")


def test_the_light_gradient_transform_is_bitwise_torch_func_under_vmap():
    task = _mlp_task()
    light, ref = light_grad.grad_and_value(task.loss), torch.func.grad_and_value(task.loss)
    assert getattr(light, "light", False), "the light transform failed its self-check on this torch"
    n, b = 4, 6
    params = task.initial_params().expand(n, -1) + 0.01 * torch.randn(n, task.initial_params().numel())
    x, y = torch.randn(n, b, 7), torch.randint(0, 5, (n, b))
    mask = (torch.arange(b) < torch.tensor([[6], [3], [1], [0]])).float()  # padded rows, one empty client
    batch = Batch(x, y, mask)
    g1, v1 = torch.func.vmap(light)(params, batch)
    g2, v2 = torch.func.vmap(ref)(params, batch)
    assert torch.equal(g1, g2) and torch.equal(v1, v2)
    assert torch.equal(g1[3], torch.zeros_like(g1[3]))  # a client without samples has no gradient
    # a second pass from the first's result (SAM's perturbed gradient) nests nothing: same again
    g3, _ = torch.func.vmap(light)(params + g1, batch)
    g4, _ = torch.func.vmap(ref)(params + g2, batch)
    assert torch.equal(g3, g4)


def test_the_light_transform_gives_zeros_for_a_loss_that_ignores_its_input():
    gv = light_grad.grad_and_value(lambda x, c: (c * c).sum())
    grad, value = torch.func.vmap(gv)(torch.ones(3, 2), torch.arange(6.0).reshape(3, 2))
    assert torch.equal(grad, torch.zeros(3, 2)) and torch.equal(value, torch.tensor([1.0, 13.0, 41.0]))


def test_torch_func_is_used_when_the_light_transform_fails_its_check(monkeypatch):
    monkeypatch.setattr(light_grad, "_CHECKED", False)
    task = _mlp_task()
    assert not getattr(light_grad.grad_and_value(task.loss), "light", False)


def test_the_cross_entropy_form_is_bitwise_cross_entropy_with_its_gradient():
    from fedsim.losses import cross_entropy

    out = (3 * torch.randn(20, 5)).requires_grad_()
    y, w = torch.randint(0, 5, (20,)), torch.rand(20)
    mine = cross_entropy(out, y)
    ref = torch.nn.functional.cross_entropy(out, y, reduction="none")
    assert torch.equal(mine, ref)
    assert torch.equal(torch.autograd.grad((mine * w).sum(), out)[0], torch.autograd.grad((ref * w).sum(), out)[0])


def test_the_fedsim_command_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "fedsim", "list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "fedavg" in proc.stdout


def test_a_plugin_cannot_shadow_a_built_in_name_that_was_not_imported_yet():
    res = _python(
        "import json\n"
        "from fedsim.registry import STRATEGIES\n"
        "def fedadam(): pass\n"
        "try:\n"
        "    STRATEGIES.register('fedadam')(fedadam)\n"
        "    print(json.dumps('registered'))\n"
        "except ValueError as exc:\n"
        "    print(json.dumps(str(exc)))"
    )
    assert res == "strategy 'fedadam' is registered twice"
