"""Tasks: the fast gradient path equals functional_call's; BatchNorm statistics join the flat vector."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.strategy import Batch
from fedsim.task import Task

from .conftest import digits_config, run_config


def make_task(module: nn.Module, shape=(1, 8, 8)) -> Task:
    return Task(module, "classification", {"input_shape": shape, "input_dtype": torch.float32})


def test_fast_grad_equals_functional_grad():
    torch.manual_seed(0)
    task = make_task(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))
    x = torch.randn(7, 1, 8, 8)
    y = torch.randint(0, 10, (7,))
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    params = task.initial_params()
    g_fast, l_fast = task.grad_fn(params, Batch(x, y, mask))
    assert task._fast is not None
    leaf = params.clone().requires_grad_(True)
    loss = task.loss(leaf, Batch(x, y, mask))
    (g_ref,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)
    assert l_fast.item() == pytest.approx(loss.item())
    # padded rows do not contribute
    g_cut, _ = task.grad_fn(params, Batch(x[:5], y[:5], torch.ones(5)))
    assert torch.allclose(g_fast, g_cut, atol=1e-6)


def test_tied_weights_share_one_slot():
    lin = nn.Linear(4, 4, bias=False)
    module = nn.Sequential(nn.Flatten(), lin, nn.ReLU(), lin)
    task = make_task(module, shape=(4,))
    assert task.layout.dim == 16
    x, y = torch.randn(3, 4), torch.randint(0, 4, (3,))
    g_fast, _ = task.grad_fn(task.initial_params(), Batch(x, y, torch.ones(3)))
    leaf = task.initial_params().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(task.loss(leaf, Batch(x, y, torch.ones(3))), leaf)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)


def test_batchnorm_statistics_are_the_last_entries_and_cumulative_ones_are_refused():
    task = make_task(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    assert task.stat_names == ("1.running_mean", "1.running_var")
    assert task.layout.dim == task.param_dim + 8
    assert torch.equal(task.initial_params()[task.param_dim:], torch.tensor([0.0] * 4 + [1.0] * 4))
    with pytest.raises(ConfigError, match="momentum=None"):
        make_task(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None)))


def tiny_net(input_shape, num_classes, width: int = 8):
    """A user model given by dotted path."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def test_dotted_path_model_and_cnn_run():
    cfg = digits_config(run={"rounds": 2})
    cfg["model"] = {"name": "tests.test_task:tiny_net", "width": 12}
    run = run_config(cfg)
    assert run.ctx.task.layout.dim == 64 * 12 + 12 + 12 * 10 + 10
    cfg["model"] = {"name": "cnn", "channels": [4, 8], "hidden": 16, "groupnorm": True}
    run = run_config(cfg)
    assert run.rows[-1]["test_accuracy"] is not None
