"""Flat vectors, extras and whole job messages survive Flower's records and wire format bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.contributions import from_outputs
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.executors.base import Job
from fedsim.flower.messages import TrainTask, decode_result, decode_task, encode_result, encode_task
from fedsim.flower.records import record_to_vector, records_to_tensors, tensors_to_records, vector_to_record
from fedsim.params import ParamLayout
from fedsim.strategy import ClientOutput, Payload

from .flower_local import over_the_wire

LAYOUT = ParamLayout(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), ((8, 5), (8,), (3, 8), (3,)))


def awkward_vector(dtype: torch.dtype) -> torch.Tensor:
    """Random values plus the ones a lossy path would change: ±0, inf, nan, subnormals, extremes."""
    x = torch.randn(LAYOUT.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    info = torch.finfo(dtype)
    x[:7] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny / 4, info.max], dtype=dtype)
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b have the same dtype, shape and bit patterns (nan == nan, 0 != −0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_flat_vector_round_trips_exactly_through_the_wire(dtype):
    x = awkward_vector(dtype)
    record = over_the_wire(vector_to_record(x, LAYOUT))
    assert same_bits(record_to_vector(record, LAYOUT), x)


def test_model_record_is_the_usual_state_dict():
    x = awkward_vector(torch.float32)
    state = vector_to_record(x, LAYOUT).to_torch_state_dict()
    assert list(state) == list(LAYOUT.names)
    for (name, view), got in zip(LAYOUT.views(x).items(), state.values()):
        assert same_bits(got, view), name


def test_named_tensors_and_numbers_round_trip_with_their_types():
    extras = {  # SCAFFOLD's c, FedHyper's learning rates, a counter, a mask, plain numbers
        "c": awkward_vector(torch.float32),
        "lr_global": torch.tensor(0.25, dtype=torch.float64),
        "lr_local": torch.tensor([0.1, 0.2], dtype=torch.float32),
        "count": torch.tensor(7),
        "mask": torch.tensor([[True, False], [False, True]]),
        "scale": 0.5, "steps": 3, "flag": True,
    }
    arrays, numbers = tensors_to_records(extras)
    back = records_to_tensors(over_the_wire(arrays), over_the_wire(numbers))
    assert set(back) == set(extras)
    for name, value in extras.items():
        if isinstance(value, torch.Tensor):
            assert same_bits(back[name], value), name
        else:
            assert type(back[name]) is type(value) and back[name] == value, name


def test_train_task_and_result_round_trip():
    x = awkward_vector(torch.float32)
    task = TrainTask(client=4, job_id=17, version=3, accepted_job=9,
                     payload=Payload(x, {"c": -x, "lr": torch.tensor(0.1), "round": 3}))
    content = over_the_wire(encode_task(task, "seed: 0\n", LAYOUT, {"lr": 0.1, "my-key": "x"}))
    got = decode_task(content, LAYOUT)
    # Flower's convention: the model under "arrays", settings and the round under "config"
    assert dict(content.config_records["config"]) == {"lr": 0.1, "my-key": "x", "server-round": 4}
    assert (got.client, got.job_id, got.version, got.accepted_job) == (4, 17, 3, 9)
    assert same_bits(got.payload.params, x) and same_bits(got.payload.extras["c"], -x)
    assert same_bits(got.payload.extras["lr"], torch.tensor(0.1)) and got.payload.extras["round"] == 3
    assert content.config_records["fedsim"]["config"] == "seed: 0\n"

    out = ClientOutput(x * 2, {"c_i": x}, {"dc": x / 3, "lr": torch.tensor(0.05)}, {"train_loss": 0.75, "grad_norm": 2.0})
    job = Job(17, 4, 3, task.payload, {}, np.zeros((8, 16), dtype=np.int64), 120)
    reply = over_the_wire(encode_result(from_outputs([job], [out]), LAYOUT))
    got = decode_result(reply, LAYOUT, x)
    job_id, client, back = got.job_id, got.client, got.output
    assert (job_id, client, got.num_examples) == (17, 4, 120)  # the node reports its sample count
    meta = reply.config_records["fedsim"]
    assert (meta["version"], meta["num-samples"], meta["num-steps"]) == (3, 120, 8)
    assert same_bits(back.update, x * 2)
    assert same_bits(back.extras["dc"], x / 3) and same_bits(back.extras["lr"], torch.tensor(0.05))
    assert back.metrics == {"train_loss": 0.75, "grad_norm": 2.0}
    assert back.state == {}  # the client's state stays on its node
    assert reply.metric_records["metrics"]["num-examples"] == 120  # Flower's convention


def test_a_reply_in_flowers_convention_gives_the_update_from_the_new_weights():
    # an ordinary ClientApp returns its new weights (a full state_dict, buffers included)
    # and metrics with num-examples; the server derives the update x_sent − y_end
    x = torch.randn(LAYOUT.dim, generator=torch.Generator().manual_seed(1))
    y = x - 0.25 * torch.arange(LAYOUT.dim, dtype=torch.float32)
    weights = dict(vector_to_record(y, LAYOUT))
    reply = over_the_wire(RecordDict({
        "arrays": ArrayRecord({"running_mean": Array(np.zeros(3, np.float32)), **weights}),
        "metrics": MetricRecord({"train_loss": 0.5, "num-examples": 37, "num-steps": 5}),
    }))
    got = decode_result(reply, LAYOUT, x)
    assert got.job_id is None and (got.num_examples, got.num_steps) == (37, 5)
    assert torch.equal(got.output.update, x - y) and got.output.metrics == {"train_loss": 0.5}
    assert got.output.extras == {}
    with pytest.raises(ValueError, match="no 'num-examples'"):
        decode_result(RecordDict({"arrays": vector_to_record(y, LAYOUT), "metrics": MetricRecord({"a": 1.0})}), LAYOUT, x)
    with pytest.raises(ValueError, match="arrays lack"):
        decode_result(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                                  "metrics": MetricRecord({"num-examples": 1})}), LAYOUT, x)


def test_conversion_refuses_what_it_cannot_carry_exactly():
    x = awkward_vector(torch.float32)
    with pytest.raises(ValueError, match=f"flat vector of {LAYOUT.dim} values"):
        vector_to_record(x[:-1], LAYOUT)
    with pytest.raises(ValueError, match="model has"):
        record_to_vector(vector_to_record(x, ParamLayout(("w",), ((LAYOUT.dim,),))), LAYOUT)
    with pytest.raises(TypeError, match="bfloat16"):
        tensors_to_records({"c": x.to(torch.bfloat16)})
    with pytest.raises(TypeError, match="'hist'.*list"):
        tensors_to_records({"hist": [1, 2]})
