"""Convolution as unfold + matrix product, for vectorised training over many clients.

Under ``vmap`` a convolution whose weights differ per client becomes one grouped
convolution (groups = clients), which cuDNN runs far below its dense speed. Written as
im2col (`F.unfold`) followed by a matrix product, the per-client weights turn into one
batched matmul instead, which the matrix units handle well. The maths is the same
convolution (zero padding, any stride/dilation, groups=1); `with_unfold_convs` swaps the
layers of a model copy without changing its parameter names, so flat vectors still fit.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class UnfoldConv2d(nn.Module):
    """A drop-in for ``nn.Conv2d`` (groups=1, zero padding) computed by unfold + matmul."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cout = self.weight.shape[0]
        kh, kw = self.kernel_size
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [n, C·kh·kw, L]
        out = self.weight.reshape(cout, -1) @ cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [cout, n·L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.reshape(cout, n, ho, wo).transpose(0, 1)


def _convertible(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def with_unfold_convs(module: nn.Module) -> tuple[nn.Module, int]:
    """Returns (a deep copy of `module` with every plain Conv2d replaced by UnfoldConv2d,
    number of layers replaced). Parameter names and order are unchanged."""
    module = copy.deepcopy(module)
    count = 0
    for name, sub in list(module.named_modules()):
        for child_name, child in list(sub.named_children()):
            if _convertible(child):
                setattr(sub, child_name, UnfoldConv2d(child))
                count += 1
    return module, count
