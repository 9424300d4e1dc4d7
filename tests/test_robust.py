"""Robust reducers against their definitions on hand-made inputs, and their tolerance of
Byzantine rows on a quadratic whose optimum is known."""
from __future__ import annotations

import itertools

import pytest
import torch

from fedsim import robust
from fedsim.merge import clipped, mix

U = torch.tensor([[0.0, 10.0], [1.0, 0.0], [2.0, 1.0], [3.0, -4.0], [100.0, 2.0]], dtype=torch.float64)


def test_median_and_trimmed_mean_by_definition():
    assert robust.coordinate_median(U).tolist() == [2.0, 1.0]
    assert robust.coordinate_median(U[:4]).tolist() == [1.5, 0.5]  # even m: mean of the two middle values
    # β = 0.2, m = 5: k = 1 value dropped at each end per coordinate
    assert robust.trimmed_mean(U, 0.2).tolist() == [2.0, 1.0]  # (1+2+3)/3, (0+1+2)/3
    assert robust.trimmed_mean(U, 0.0).tolist() == U.mean(0).tolist()


def _krum_score(rows: torch.Tensor, i: int, f: int) -> float:
    others = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(len(rows)) if j != i)
    return sum(others[:len(rows) - f - 2])


def test_krum_and_multi_krum_by_definition():
    rows = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [0.3, 0.1], [9.0, 9.0], [-5.0, 7.0]], dtype=torch.float64)
    f = 1
    scores = [_krum_score(rows, i, f) for i in range(len(rows))]
    torch.testing.assert_close(robust.krum_scores(rows, f), torch.tensor(scores, dtype=torch.float64))
    best = min(range(len(rows)), key=scores.__getitem__)
    assert robust.krum(rows, f).tolist() == rows[best].tolist()
    two = sorted(range(len(rows)), key=scores.__getitem__)[:2]
    torch.testing.assert_close(robust.krum(rows, f, select=2), rows[two].mean(0))


def test_bulyan_by_definition():
    rows = torch.tensor([[0.0], [0.2], [0.1], [0.4], [0.3], [0.25], [50.0]], dtype=torch.float64)  # m = 7 = 4f + 3
    f = 1
    # θ = m − 2f = 5 picks by repeated Krum; then per coordinate the β = θ − 2f = 3 values
    # closest to the picks' median, averaged
    pool, picks = list(range(len(rows))), []
    for _ in range(5):
        sub = rows[pool]
        best = min(range(len(pool)), key=lambda i: _krum_score(sub, i, f))
        picks.append(pool.pop(best))
    chosen = rows[picks][:, 0].tolist()
    med = sorted(chosen)[2]
    closest = sorted(chosen, key=lambda v: abs(v - med))[:3]
    assert 6 not in picks
    assert robust.bulyan(rows, f).item() == pytest.approx(sum(closest) / 3)


def test_centered_clip_by_definition():
    center = torch.tensor([1.0, 1.0], dtype=torch.float64)
    tau = 2.0
    expected = center.clone()
    for _ in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        for u in U:
            z = u - expected
            step += z * min(1.0, tau / float(z.norm()))
        expected = expected + step / len(U)
    torch.testing.assert_close(robust.centered_clip(U, center, tau, iters=2), expected)


def test_clip_to_norm_bounds_rows_and_keeps_short_ones():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = robust.clip_to_norm(z, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_clipped_gossip_is_mix_for_a_huge_radius_and_clips_each_pull():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = torch.rand(5, 5, generator=g, dtype=torch.float64)
    w = w / w.sum(1, keepdim=True)
    own = torch.arange(5)
    torch.testing.assert_close(clipped(1e9)(x, w, own, None), mix(x, w, own, None))
    tau = 0.3
    expected = torch.stack([x[r] + sum(w[r, j] * robust.clip_to_norm(x[j] - x[r], tau) for j in range(5))
                            for r in range(5)])
    torch.testing.assert_close(clipped(tau)(x, w, own, None), expected)


def _descend(reduce, honest: int, byzantine: int, steps: int = 200) -> torch.Tensor:
    """Gradient descent on f(x) = ½‖x − x*‖² with `honest` clients sending noisy gradients and
    `byzantine` ones sending a huge fixed vector; returns the final distance to x*."""
    g = torch.Generator().manual_seed(1)
    opt = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    center = torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        good = (x - opt) + 0.1 * torch.randn(honest, 3, generator=g, dtype=torch.float64)
        bad = torch.full((byzantine, 3), -1e3, dtype=torch.float64)
        center = reduce(torch.cat([good, bad]), center)
        x = x - 0.1 * center
    return (x - opt).norm()


@pytest.mark.parametrize("name,knobs", [("median", {}), ("krum", {"f": 2}), ("krum", {"f": 2, "select": 3}),
                                        ("bulyan", {"f": 2}), ("trimmed_mean", {"trim": 0.2}),
                                        ("centered_clip", {"tau": 1.0, "iters": 3})])
def test_robust_reducers_tolerate_f_byzantine_rows_where_the_mean_does_not(name, knobs):
    reduce = robust.REDUCERS.get(name).factory(**knobs)
    assert _descend(reduce, honest=9, byzantine=2) < 0.5  # centered clipping keeps a bias of order (f/m)·τ
    assert _descend(robust.REDUCERS.get("mean").factory(), honest=9, byzantine=2) > 100
