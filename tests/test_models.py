"""Built-in models: each builds for its data with the papers' parameter counts, trains a step
forward and backward; the vmap executor reproduces the serial one's run to rounding, Ray bit
for bit."""
from __future__ import annotations

import pytest
import torch

from fedsim.models import ModelContext
from fedsim.registry import MODELS

from .conftest import merge, run_config
from .test_ray_executor import cluster, on_ray  # noqa: F401 - the module's Ray cluster fixture
from .test_vmap_executor import compare_runs, final_params

# fp32 convolutions under vmap run as one grouped convolution, which sums in another order
# than the serial executor's per-client ones: deep conv nets agree to ~1e-5 after a few steps
CONV_RTOL = 2e-4

CASES = [
    ("lenet5", ModelContext((1, 28, 28), 10, "classification"), torch.randn(2, 1, 28, 28), 61_706),
    ("lenet5", ModelContext((3, 32, 32), 10, "classification"), torch.randn(2, 3, 32, 32), None),
    ("resnet20", ModelContext((3, 32, 32), 10, "classification"), torch.randn(2, 3, 32, 32), 269_722),
    ("resnet18", ModelContext((3, 32, 32), 10, "classification"), torch.randn(2, 3, 32, 32), 11_173_962),
    ("femnist_cnn", ModelContext((1, 28, 28), 62, "classification"), torch.randn(2, 1, 28, 28), 6_603_710),
    ("char_lstm", ModelContext((80,), 80, "classification"), torch.randint(0, 80, (2, 80)), 817_872),
    ("transformer_lm", ModelContext((16,), 50, "lm"), torch.randint(0, 50, (2, 16)), None),
]


@pytest.mark.parametrize("name,ctx,x,count", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1].input_shape))}" for c in CASES])
def test_model_builds_and_trains_one_step(name, ctx, x, count):
    torch.manual_seed(0)
    model = MODELS.get(name, "model").factory(ctx)
    if count is not None:  # the papers' parameter counts
        assert sum(p.numel() for p in model.parameters()) == count
    out = model(x)
    want = (2, 16, 50) if ctx.task == "lm" else (2, ctx.num_classes)
    assert tuple(out.shape) == want
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_refuse_data_they_do_not_fit():
    with pytest.raises(ValueError, match="image inputs"):
        MODELS.get("resnet20", "model").factory(ModelContext((64,), 10, "classification"))
    with pytest.raises(ValueError, match="task 'lm'"):
        MODELS.get("transformer_lm", "model").factory(ModelContext((16,), 10, "classification"))


def image_config(model: dict, **sections) -> dict:
    """3 rounds of 4 clients on 16×16 (lenet5: 32×32) images, 2 local steps of batch 8."""
    cfg = {
        "name": "images", "seed": 3,
        "data": {"name": "tests.tiny_sources:images", "num_clients": 4, "partition": "iid", "size": 16},
        "model": model,
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.05, "batch_size": 8, "steps": 2, "momentum": 0.5},
        "protocol": {"name": "sync"},
        "run": {"rounds": 2, "eval_every": 1, "progress": False},
    }
    return merge(cfg, sections)


def test_lenet5_vmap_equals_serial():
    compare_runs(image_config({"name": "lenet5"}, data={"size": 32, "channels": 1}), rtol=CONV_RTOL)


def test_resnet20_groupnorm_vmap_equals_serial():
    a, _ = compare_runs(image_config({"name": "resnet20"}), rtol=CONV_RTOL)
    assert a.ctx.task.stat_names == ()  # GroupNorm by default: no running statistics


def test_char_lstm_and_transformer_lm_vmap_equal_serial():
    compare_runs({
        "name": "chars", "seed": 1,
        "data": {"name": "tests.tiny_sources:chars", "num_clients": 3, "partition": "iid"},
        "model": {"name": "char_lstm", "hidden": 16, "embedding": 4},
        "local": {"lr": 0.5, "batch_size": 8, "steps": 2},
        "run": {"rounds": 2, "eval_every": 2, "progress": False},
    })
    compare_runs({
        "name": "lm", "seed": 1,
        "data": {"name": "tests.tiny_sources:tokens", "num_clients": 3, "partition": "iid"},
        "model": {"name": "transformer_lm", "width": 16, "heads": 2, "layers": 1, "mlp": 32},
        "local": {"lr": 0.5, "batch_size": 8, "steps": 2},
        "run": {"rounds": 2, "eval_every": 2, "progress": False},
    })

SMALL_RUNS = {
    "lenet5": image_config({"name": "lenet5"}, data={"size": 28, "channels": 1}, run={"rounds": 1}),
    "resnet20": image_config({"name": "resnet20"}, data={"size": 8}, run={"rounds": 1}),
    "char_lstm": {"name": "chars", "seed": 1,
                  "data": {"name": "tests.tiny_sources:chars", "num_clients": 3, "partition": "iid"},
                  "model": {"name": "char_lstm", "hidden": 16, "embedding": 4},
                  "local": {"lr": 0.5, "batch_size": 8, "steps": 2}, "run": {"rounds": 1, "progress": False}},
    "transformer_lm": {"name": "lm", "seed": 1,
                       "data": {"name": "tests.tiny_sources:tokens", "num_clients": 3, "partition": "iid"},
                       "model": {"name": "transformer_lm", "width": 16, "heads": 2, "layers": 1, "mlp": 32},
                       "local": {"lr": 0.5, "batch_size": 8, "steps": 2}, "run": {"rounds": 1, "progress": False}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_ray_equals_serial(cluster, name):  # noqa: F811 - the fixture
    cfg = merge(SMALL_RUNS[name], {"run": {"torch_threads": 1}})
    a = run_config(cfg)
    b = run_config(on_ray(cfg, num_actors=2))
    assert torch.equal(final_params(a), final_params(b))
