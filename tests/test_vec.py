"""Flat-vector helpers: the weighted sum's stacked path (small vectors) against the one-by-one
path (large vectors), for sequences and stacked tensors, on any number of CPU threads."""
from __future__ import annotations

import pytest
import torch

from fedsim import vec


def _terms(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(shape, generator=gen) for _ in range(n)]
    weights = torch.rand(n, generator=gen).tolist()
    return vectors, weights


@pytest.mark.parametrize("stack_bytes", [1 << 28, 3 * 40 * 4, 1])  # one stack, stacks of 3 rows, one row each
@pytest.mark.parametrize("shape", [(40,), (5, 8)])
def test_the_stacked_weighted_sum_equals_the_sequential_one(monkeypatch, stack_bytes, shape):
    monkeypatch.setattr(vec, "STACK_BYTES", stack_bytes)
    vectors, weights = _terms(11, shape)
    stacked = vec.weighted_sum(vectors, weights)
    monkeypatch.setattr(vec, "CPU_STACK_MAX_VECTOR_BYTES", 0)  # every vector "large": one by one, in order
    sequential = vec.weighted_sum(vectors, weights)
    reference = sum(w * v.double() for v, w in zip(vectors, weights))
    torch.testing.assert_close(stacked, sequential, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stacked.double(), reference, rtol=1e-6, atol=1e-6)
    assert stacked.shape == shape and stacked.dtype == torch.float32


@pytest.mark.parametrize("max_vector_bytes", [vec.CPU_STACK_MAX_VECTOR_BYTES, 0])  # stacked, one by one
def test_a_sequence_and_its_stack_sum_to_the_same_bits(monkeypatch, max_vector_bytes):
    monkeypatch.setattr(vec, "CPU_STACK_MAX_VECTOR_BYTES", max_vector_bytes)
    vectors, weights = _terms(300, (610,), seed=1)
    assert torch.equal(vec.weighted_sum(vectors, weights), vec.weighted_sum(torch.stack(vectors), weights))


@pytest.mark.parametrize("n, shape", [(1000, (610,)), (7, (5,)), (64, (1,)), (3, (14_210,))])
def test_the_weighted_sum_does_not_depend_on_the_cpu_thread_count(n, shape):
    vectors, weights = _terms(n, shape, seed=2)
    stack = torch.stack(vectors)
    before = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            sums.append(vec.weighted_sum(stack, weights))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(sums[0], s) for s in sums[1:])


def test_one_vector_and_no_vectors():
    v = torch.arange(4.0)
    assert torch.equal(vec.weighted_sum([v], [0.5]), v * 0.5)
    with pytest.raises(ValueError):
        vec.weighted_sum([], [])


@pytest.mark.cuda
def test_on_cuda_the_weighted_sum_is_deterministic_and_matches_the_cpu():
    vectors, weights = _terms(1000, (14_210,), seed=3)
    on_gpu = [v.cuda() for v in vectors]
    a, b = vec.weighted_sum(on_gpu, weights), vec.weighted_sum(on_gpu, weights)
    assert torch.equal(a, b)
    exact = sum(w * v.double() for v, w in zip(vectors, weights))
    scale = sum(abs(w) * v.double().abs() for v, w in zip(vectors, weights))  # Σ|w_i v_i|, per entry
    for got in (a.cpu(), vec.weighted_sum(vectors, weights)):  # on the GPU and on the CPU
        assert ((got.double() - exact).abs() <= 1e-6 * scale).all()


def test_stack_on_equals_stack_and_takes_rows_from_several_devices():
    from fedsim.vec import stack_on

    rows = [torch.arange(6.0).reshape(2, 3) + i for i in range(5)]
    assert torch.equal(stack_on(rows, "cpu"), torch.stack(rows))
    # a stored row on the CPU beside fresh rows made on the target device (the GPU under
    # keep_on_device; "meta" here): torch.stack refuses the mix, stack_on places each row
    meta = torch.device("meta")
    mixed = [rows[0], torch.empty(2, 3, device=meta), rows[2], torch.empty(2, 3, device=meta)]
    with pytest.raises(RuntimeError):
        torch.stack(mixed)
    got = stack_on(mixed, meta)
    assert got.shape == (4, 2, 3) and got.device == meta and got.dtype == rows[0].dtype
