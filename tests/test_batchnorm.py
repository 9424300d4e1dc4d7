"""BatchNorm running statistics travel with the model: a job's statistics equal a plain torch
training loop's, serial == vmap (and Ray, with augmentation) in both modes, and they (and the
augmentations) survive a resume."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from fedsim.batchnorm import STATE_KEY
from fedsim.checkpoint import load_latest
from fedsim.cli import main
from fedsim.errors import ConfigError
from fedsim.outputs import read_jsonl

from .conftest import merge, run_config
from .test_ray_executor import cluster, on_ray  # noqa: F401 - the module's Ray cluster fixture
from .test_resume_protocols import assert_same_run, run_killed_at_checkpoint
from .test_vmap_executor import compare_runs, final_params


def bn_net(input_shape, num_classes, width: int = 4):
    """A user model with BatchNorm (running statistics) after a convolution and a linear layer."""
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * h * w, 8), nn.BatchNorm1d(8, momentum=0.3), nn.ReLU(),
                         nn.Linear(8, num_classes))


def bn_config(bn: str = "global", **sections) -> dict:
    """4 clients on 8×8 three-channel images, `bn_net`, 2 rounds of 2 local steps."""
    cfg = {
        "name": "bn", "seed": 5,
        "data": {"name": "tests.tiny_sources:images", "num_clients": 4, "partition": "iid", "size": 8},
        "model": {"name": "tests.test_batchnorm:bn_net", "bn": bn},
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.1, "batch_size": 8, "steps": 2},
        "protocol": {"name": "sync"},
        "run": {"rounds": 2, "eval_every": 1, "progress": False},
    }
    return merge(cfg, sections)


def test_a_round_of_one_client_equals_a_plain_torch_training_loop():
    # one client, full batches (every step sees all 80 samples), FedAvg: the global model after
    # the round is the client's model, statistics included, and must equal nn.BatchNorm's
    cfg = bn_config(data={"num_clients": 1}, local={"batch_size": 80, "steps": 3}, run={"rounds": 1})
    run = run_config(cfg)
    task = run.ctx.task
    start = task.layout.views(task.initial_params())
    torch.manual_seed(0)
    plain = bn_net((3, 8, 8), 4)
    plain.load_state_dict({**plain.state_dict(), **start})
    x, y = run.ctx.data.x_train, run.ctx.data.y_train
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()
    got = task.layout.views(final_params(run))
    for name, want in plain.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(got["1.running_var"], torch.ones(4))  # the statistics did move
    # evaluation uses the stored statistics: the test loss is nn.BatchNorm's in eval mode
    plain.eval()
    with torch.no_grad():
        test_loss = torch.nn.functional.cross_entropy(plain(run.ctx.data.source.x_test), run.ctx.data.source.y_test)
    assert run.rows[-1]["test_loss"] == pytest.approx(float(test_loss), rel=1e-5)


def test_padding_rows_do_not_enter_the_batch_statistics():
    run = run_config(bn_config(run={"rounds": 1}))
    task = run.ctx.task
    params = task.initial_params()
    x, y = run.ctx.data.x_train[:6], run.ctx.data.y_train[:6]
    from fedsim.strategy import Batch
    full = task.stats_grad_fn(params, Batch(x[:4], y[:4], torch.ones(4)))
    padded = task.stats_grad_fn(params, Batch(x, y, torch.tensor([1.0, 1, 1, 1, 0, 0])))
    assert torch.allclose(full[0], padded[0], atol=1e-6) and torch.allclose(full[1][1], padded[1][1], atol=1e-6)


@pytest.mark.parametrize("bn", ["global", "local"])
def test_vmap_equals_serial(bn):
    a, b = compare_runs(bn_config(bn, local={"momentum": 0.5}))
    task = a.ctx.task
    stats = final_params(a)[task.param_dim:]
    initial = task.initial_params()[task.param_dim:]
    if bn == "global":  # averaged into the global model
        assert not torch.equal(stats, initial)
        return
    assert torch.equal(stats, initial)  # the global model keeps its initial statistics
    for run in (a, b):
        own = {c: s[STATE_KEY] for c, s in run.ctx.store.items()}
        assert sorted(own) == [0, 1, 2, 3]
        assert not torch.equal(own[0], own[1]) and not torch.equal(own[0], initial)
    for c, s in a.ctx.store.items():
        assert torch.allclose(b.ctx.store.get(c)[STATE_KEY], s[STATE_KEY], rtol=1e-5, atol=1e-7)


def test_local_statistics_are_refused_for_gossip():
    cfg = bn_config("local", strategy={"name": "dfedavg"}, protocol={"name": "decentralized"})
    with pytest.raises(ConfigError, match="model.bn"):
        run_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["global", "local"])
def test_ray_equals_serial(cluster, bn):  # noqa: F811 - the fixture
    cfg = bn_config(bn, run={"torch_threads": 1}, data={"augment_crop": 2, "augment_flip": True})
    a = run_config(cfg)
    b = run_config(on_ray(cfg, num_actors=2))
    assert torch.equal(final_params(a), final_params(b))
    assert [r["test_loss"] for r in a.rows] == [r["test_loss"] for r in b.rows]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tmp_yaml):
    # local statistics live in the client-state store, augmentations are keyed by the job: a
    # resume that lost the one or redrew the other would differ
    cfg = bn_config("local", protocol={"name": "sync", "clients_per_round": 2},
                    data={"augment_crop": 2, "augment_flip": True},
                    run={"rounds": 40, "checkpoint_every": 1, "keep_checkpoints": 2, "log_events": True,
                         "torch_threads": 1})
    reference = tmp_path / "reference"
    run_config(cfg, reference)
    at = random.randint(3, 13)
    out = tmp_path / "run"
    run_killed_at_checkpoint(tmp_yaml(cfg), out, at)
    assert load_latest(out)[0]["protocol_state"] is not None
    assert main(["resume", str(out), "--quiet"]) == 0, f"killed after checkpoint {at}"
    assert_same_run(out, reference)
    assert len(read_jsonl(out / "metrics.jsonl")) == 41  # round 0 and every round


def test_gossip_nodes_with_independent_initialisations_carry_statistics():
    cfg = bn_config(strategy={"name": "gossip"}, protocol={"name": "async_gossip", "init": "independent"},
                    topology={"name": "ring"}, run={"rounds": None, "time_budget": 0.1, "eval_every_time": 0.05})
    run = run_config(cfg)
    models = run.final_state.models
    task = run.ctx.task
    assert not torch.equal(models[0, :task.param_dim], models[1, :task.param_dim])  # independent draws
    assert not torch.equal(models[0, task.param_dim:], task.initial_params()[task.param_dim:])  # trained statistics
