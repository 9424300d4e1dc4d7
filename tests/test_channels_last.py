"""executor.conv 'channels_last': vmap's grouped convolutions get the clients' images
channels-last, the results equal the serial executor's, and a model that cannot take that
layout keeps the default one with a warning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedsim.executors.channels_last import accepts_channels_last, clients_channels_last
from fedsim.executors.light_grad import grad_and_value
from fedsim.task import Task

from .conftest import digits_config, merge, run_config
from .test_vmap_executor import compare_runs, final_params, rel

CNN = {"name": "cnn", "channels": [4, 8], "hidden": 16}


class GroupedConvInputs(TorchDispatchMode):
    """Records every grouped convolution (groups > 1: per-client weights under vmap) as
    (input channels per client, whether its input is laid out channels-last)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[8] > 1:
            x, groups = args[0], args[8]
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            self.seen.append((x.shape[1] // groups, cl))
        return func(*args, **(kwargs or {}))


def image_config(tmp_path, **sections) -> dict:
    """A small run on 3-channel 8×8 images (random, labels from their mean colour) that the
    test writes as an .npz file."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(240, 3, 8, 8)).astype(np.float32)
    y = x.mean(axis=(2, 3)).argmax(axis=1)
    np.savez(tmp_path / "images.npz", x=x, y=y)
    cfg = digits_config(data={"name": "npz", "path": str(tmp_path / "images.npz"), "num_clients": 6,
                              "partition": "iid"}, run={"rounds": 2, "eval_every": 2})
    return merge(cfg, sections)


def test_layout_keeps_shape_and_values_and_leaves_other_tensors_alone():
    x = torch.randn(3, 2, 4, 5, 6, 7)
    y = clients_channels_last(x)
    assert y.shape == x.shape and torch.equal(y, x)
    assert y.permute(1, 2, 4, 5, 0, 3).is_contiguous()  # stored as [K, B, H, W, M, C]
    flat = torch.randn(3, 2, 4, 60)
    assert clients_channels_last(flat) is flat


@pytest.mark.parametrize("conv", ["channels_last", "native"])
def test_grouped_convolutions_get_channels_last_images(tmp_path, conv):
    # two convolutions in a row (pfl's simple_cnn has that shape): with the layout, both take
    # channels-last input; natively neither does
    plugin = tmp_path / "two_convs.py"
    plugin.write_text(TWO_CONVS)
    cfg = {**image_config(tmp_path, executor={"kind": "vmap", "device": "cpu", "conv": conv}),
           "plugins": [str(plugin)], "model": {"name": "two_convs"}}
    seen = GroupedConvInputs()
    with seen:
        run_config(cfg)
    assert {c for c, _ in seen.seen} == {3, 4}  # the images (3 channels) and the first convolution's output (4)
    assert all(cl == (conv == "channels_last") for _, cl in seen.seen)


def test_pooling_between_convolutions_sends_the_next_one_back_to_the_default_layout(tmp_path):
    # fedsim's cnn: [conv, ReLU, max-pool] blocks; vmap's pooling copies its input to the default
    # layout, so only the first convolution of each step runs channels-last (documented)
    seen = GroupedConvInputs()
    with seen:
        run_config(image_config(tmp_path, model=CNN, executor={"kind": "vmap", "device": "cpu", "conv": "channels_last"}))
    assert {cl for c, cl in seen.seen if c == 3} == {True}
    assert {cl for c, cl in seen.seen if c == 4} == {False}


def test_cnn_with_channels_last_images_equals_serial(tmp_path):
    cfg = image_config(tmp_path, model=CNN, local={"momentum": 0.9}, run={"rounds": 3, "eval_every": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CNN takes the layout: no warning
        compare_runs(cfg, conv="channels_last")


TWO_CONVS = '''
from torch import nn
from fedsim.registry import MODELS


@MODELS.register("two_convs")
def two_convs(ctx):
    """conv 3->4, ReLU, conv 4->4, ReLU, linear."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, ctx.num_classes))
'''

VIEWING_MLP = '''
from torch import nn
from fedsim.registry import MODELS


class ViewingMLP(nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))  # a view: needs the default (contiguous) layout


@MODELS.register("viewing_mlp")
def viewing_mlp(ctx):
    """A linear model that flattens its images with .view."""
    c, h, w = ctx.input_shape
    return ViewingMLP(c * h * w, ctx.num_classes)
'''


def test_model_that_views_its_images_keeps_the_native_layout(tmp_path):
    plugin = tmp_path / "viewing_mlp.py"
    plugin.write_text(VIEWING_MLP)
    cfg = {**image_config(tmp_path), "plugins": [str(plugin)], "model": {"name": "viewing_mlp"}}
    with pytest.warns(RuntimeWarning, match=r"executor.conv 'channels_last'.*using the native layout"):
        b = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu", "conv": "channels_last"}})
    a = run_config(cfg)
    assert rel(final_params(b), final_params(a)) <= 1e-6


def test_with_augmentation_normalisation_and_padded_static_buffers_equals_serial(tmp_path, monkeypatch):
    # the layout applies after cropping and flipping, on the CUDA-graph path (run uncaptured on the CPU)
    cfg = image_config(tmp_path, model=CNN, data={"augment_crop": 2, "augment_flip": True,
                                                  "normalize_mean": [0.1, 0.0, -0.1], "normalize_std": [1.5, 2.0, 0.5]})
    monkeypatch.setattr("fedsim.executors.vmap.EXACT_SIZES", 0)  # pad every cohort to its bucket
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layout is taken, not declined
        compare_runs(cfg, conv="channels_last", graphs=True)


def test_groupnorm_declines_the_layout_under_vmap(tmp_path):
    # torch's group norm asks for channels-last copies and strides, which vmap does not implement
    cfg = image_config(tmp_path, model={**CNN, "groupnorm": True})
    with pytest.warns(RuntimeWarning, match=r"executor.conv 'channels_last'.*vmap.*using the native layout"):
        b = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu", "conv": "channels_last"}})
    assert rel(final_params(b), final_params(run_config(cfg))) <= 1e-6


class _View(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


def _verdict(*layers: nn.Module, randomness: str = "error") -> str | None:
    """accepts_channels_last for a model of `layers` on four random 3×8×8 images."""
    task = Task(nn.Sequential(*layers), "classification", {"input_shape": (3, 8, 8)})
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    return accepts_channels_last(task, grad_and_value(task.loss), x, y, torch.float32, randomness)


def test_the_probe_blames_the_layout_only_where_the_native_layout_runs():
    assert _verdict(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)) is None
    assert "view" in _verdict(_View(), nn.Linear(3 * 8 * 8, 2))
    # dropout under executor.randomness 'error' fails whatever the layout: the cohort reports it
    dropout = (nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert _verdict(*dropout) is None
    assert _verdict(*dropout, randomness="different") is None
