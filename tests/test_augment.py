"""Augmentation: crop and flip equal a direct per-image reference, are keyed by (seed,
client, job) so vmap trains on the serial executor's images, and evaluation only normalises."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsim.augment import Augment, apply, job_draws
from fedsim.errors import ConfigError

from .conftest import run_config
from .test_models import image_config
from .test_vmap_executor import compare_runs, final_params

CIFAR_LIKE = {"augment_crop": 2, "augment_flip": True, "normalize_mean": [0.1, 0.0, -0.1], "normalize_std": [1.5, 2.0, 0.5]}
SMALL_CNN = {"name": "cnn", "channels": [4], "hidden": 8, "groupnorm": True}


def test_crop_and_flip_equal_a_direct_reference():
    x = torch.randn(2, 3, 3, 5, 6)  # [K, B, C, H, W]
    draws = torch.from_numpy(job_draws(Augment(2, True), 0, 1, 7, 2, 3))
    assert draws[..., :2].min() >= 0 and draws[..., :2].max() <= 4 and set(draws[..., 2].unique().tolist()) == {0, 1}
    out = apply(x, draws, 2)
    for k in range(2):
        for b in range(3):
            dy, dx, flip = draws[k, b].tolist()
            want = F.pad(x[k, b], (2, 2, 2, 2))[:, dy : dy + 5, dx : dx + 6]
            assert torch.equal(out[k, b], want.flip(-1) if flip else want)


def test_draws_depend_on_seed_client_and_job_only():
    a = job_draws(Augment(4, True), 3, 5, 11, 4, 8)
    assert np.array_equal(a, job_draws(Augment(4, True), 3, 5, 11, 4, 8))
    assert not np.array_equal(a, job_draws(Augment(4, True), 3, 5, 12, 4, 8))
    assert not np.array_equal(a, job_draws(Augment(4, True), 3, 6, 11, 4, 8))


def test_vmap_trains_on_the_serial_executors_augmented_images():
    cfg = image_config(SMALL_CNN, data={"size": 8, **CIFAR_LIKE})
    a, _ = compare_runs(cfg)
    plain = run_config(image_config(SMALL_CNN, data={"size": 8, "normalize_mean": CIFAR_LIKE["normalize_mean"],
                                                     "normalize_std": CIFAR_LIKE["normalize_std"]}))
    assert not torch.allclose(final_params(a), final_params(plain), atol=1e-4)  # augmentation changed training


def test_evaluation_normalises_and_does_not_augment():
    run = run_config(image_config(SMALL_CNN, data={"size": 8, **CIFAR_LIKE}))
    task, src = run.ctx.task, run.ctx.data.source
    mean = torch.tensor(CIFAR_LIKE["normalize_mean"]).reshape(-1, 1, 1)
    std = torch.tensor(CIFAR_LIKE["normalize_std"]).reshape(-1, 1, 1)
    from torch.func import functional_call
    with torch.no_grad():
        out = functional_call(task.module, task.layout.views(final_params(run)), ((src.x_test - mean) / std,))
    assert run.rows[-1]["test_loss"] == pytest.approx(float(F.cross_entropy(out, src.y_test)), rel=1e-6)


@pytest.mark.parametrize("data,key", [
    ({"normalize_mean": [0.5, 0.5, 0.5]}, "data.normalize_std"),
    ({"normalize_mean": [0.5], "normalize_std": [1.0]}, "data.normalize_mean"),
    ({"normalize_mean": [0.5] * 3, "normalize_std": [1.0, 0.0, 1.0]}, "data.normalize_std"),
])
def test_bad_normalisation_is_one_line_at_its_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run_config(image_config(SMALL_CNN, data={"size": 8, **data}))
    assert "\n" not in str(err.value)


def test_crops_of_non_images_are_refused():
    cfg = {"data": {"name": "tests.tiny_sources:regression", "num_clients": 2, "partition": "iid", "augment_crop": 4},
           "model": {"name": "mlp"}, "run": {"rounds": 1, "progress": False}}
    with pytest.raises(ConfigError, match=r"data\.augment_crop"):
        run_config(cfg)
