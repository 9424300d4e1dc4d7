"""Flat-vector helpers: the weighted sum's stacked path (used on GPUs) against the sequential one."""
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
    sequential = vec.weighted_sum(vectors, weights)  # CPU tensors: one by one, in order
    stacked = vec._stacked_weighted_sum(vectors, weights)
    reference = sum(w * v.double() for v, w in zip(vectors, weights))
    torch.testing.assert_close(stacked, sequential, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stacked.double(), reference, rtol=1e-6, atol=1e-6)
    assert stacked.shape == shape and stacked.dtype == torch.float32


def test_one_vector_and_no_vectors():
    v = torch.arange(4.0)
    assert torch.equal(vec.weighted_sum([v], [0.5]), v * 0.5)
    with pytest.raises(ValueError):
        vec.weighted_sum([], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_weighted_sum_is_deterministic_and_matches_the_cpu():
    vectors, weights = _terms(1000, (14_210,), seed=3)
    on_gpu = [v.cuda() for v in vectors]
    a, b = vec.weighted_sum(on_gpu, weights), vec.weighted_sum(on_gpu, weights)
    assert torch.equal(a, b)
    exact = sum(w * v.double() for v, w in zip(vectors, weights))
    scale = sum(abs(w) * v.double().abs() for v, w in zip(vectors, weights))  # Σ|w_i v_i|, per entry
    for got in (a.cpu(), vec.weighted_sum(vectors, weights)):  # stacked on the GPU, one by one on the CPU
        assert ((got.double() - exact).abs() <= 1e-6 * scale).all()
