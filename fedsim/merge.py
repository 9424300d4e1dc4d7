"""Merge rules of decentralized strategies: pure functions over stacks of flat models.

Signature (the `Strategy.merge` contract): ``merge(models [m, d], weights [k, m], own [k],
layout) -> [k, d]`` — row r of `weights` holds receiver r's weight on each model, ``own[r]``
is the index of receiver r's own model among `models`.

* `mix`: plain gossip averaging, ``weights @ models`` (one matmul, sparse or dense).
* `variance_corrected`: VCA (Tian, Al-Ars, Kitsak, Hofstee, arXiv 2404.04616, checked
  against the authors' code; docs/algorithms.md): mix, then rescale every parameter
  tensor around its mean so that its variance equals the weighted mean variance of the
  *received* models (the receiver's own model is left out of the target).
"""
from __future__ import annotations

import torch

from .params import ParamLayout

Tensor = torch.Tensor


def mix(models: Tensor, weights: Tensor, own: Tensor, layout: ParamLayout) -> Tensor:
    """Returns ``weights @ models``: receiver r's model becomes Σ_j weights[r, j] · models[j]."""
    return weights @ models


def tensor_variances(models: Tensor, layout: ParamLayout) -> Tensor:
    """Returns the population variance of each parameter tensor of each model, ``[m, L]``."""
    return torch.stack([part.var(dim=-1, unbiased=False) for part in models.split(layout.sizes, dim=-1)], dim=-1)


def rescale_variance(models: Tensor, target: Tensor, layout: ParamLayout) -> Tensor:
    """Returns `models` ``[k, d]`` with each tensor ℓ rescaled around its mean μ to variance
    ``target[:, ℓ]``: μ + s·(w − μ), s = √(target / Var w). Tensors with zero variance (or a
    single entry) are left unchanged: no rescaling can give them a spread."""
    out = []
    for part, tgt in zip(models.split(layout.sizes, dim=-1), target.unbind(-1)):
        mean = part.mean(dim=-1, keepdim=True)
        var = part.var(dim=-1, unbiased=False, keepdim=True)
        ok = var > 0
        scale = torch.where(ok, (tgt.unsqueeze(-1) / torch.where(ok, var, 1.0)).sqrt(), 1.0)
        out.append(mean + scale * (part - mean))
    return torch.cat(out, dim=-1)


def variance_corrected(models: Tensor, weights: Tensor, own: Tensor, layout: ParamLayout) -> Tensor:
    """VCA: returns the mixed models, each tensor rescaled to the mean variance of the models the
    receiver got (weights renormalised without its own model); a receiver that got nothing keeps
    the plain mix."""
    mixed = mix(models, weights, own, layout)
    others = weights.to_dense().clone() if weights.layout != torch.strided else weights.clone()
    rows = torch.arange(others.shape[0], device=others.device)
    others[rows, own] = 0
    total = others.sum(dim=1, keepdim=True)
    target = (others @ tensor_variances(models, layout)) / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, rescale_variance(mixed, target, layout), mixed)


def clipped(tau: float):
    """Returns ClippedGossip's merge (He, Karimireddy, Jaggi, arXiv 2202.01545, fixed radius τ):
    receiver r moves to x_r + Σ_j W_rj · clip_τ(x_j − x_r), clip_τ(z) = z·min(1, τ/‖z‖), so
    no neighbour can pull it further than τ·Σ_j W_rj. With rows of W summing to 1 and every
    neighbour within τ this is plain gossip (`mix`). Computed as (W∘S) @ X − rowsum(W∘S)·x_r
    + rowsum(W)·x_r with S_rj = min(1, τ/‖x_j − x_r‖): one distance matrix, no [k, m, d] stack."""

    def merge(models: Tensor, weights: Tensor, own: Tensor, layout: ParamLayout) -> Tensor:
        w = weights.to_dense() if weights.layout != torch.strided else weights
        mine = models[own]
        dist = torch.cdist(mine.unsqueeze(0), models.unsqueeze(0)).squeeze(0)  # [k, m]
        scale = torch.clamp(tau / torch.clamp(dist, min=torch.finfo(models.dtype).tiny), max=1.0)
        ws = w * scale
        return ws @ models + (w.sum(dim=1) - ws.sum(dim=1)).unsqueeze(1) * mine

    return merge
