"""ResNets for 32×32 images (He et al., 2016, "Deep Residual Learning for Image Recognition").

* `resnet20`: the paper's CIFAR network (§4.2): a 3×3 conv of 16 channels, three stages of
  three basic blocks (16, 32, 64 channels; the last two start with stride 2), global average
  pooling, classifier; identity shortcuts with zero-padded channels where the shape changes
  (the paper's option A); 0.27M parameters.
* `resnet18`: the ImageNet ResNet-18's four stages of two basic blocks (64–512 channels) with
  the CIFAR stem FL papers use: a 3×3 stride-1 conv and no max-pool; 1×1-conv shortcuts
  where the shape changes (option B); 11.2M parameters.

Normalisation is GroupNorm by default (2 groups, as Hsieh et al., 2020 recommend for non-IID
federated training); `norm: batch` gives the papers' BatchNorm, whose running statistics
fedsim carries with the model (see docs/models.md).
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Ge
from ..registry import MODELS
from . import ModelContext, _require_classes, image_shape
from .norm import Norm, norm2d


class BasicBlock(nn.Module):
    """Two 3×3 conv-norm layers with a shortcut: 'project' (1×1 conv + norm) or 'pad'
    (option A: subsample and zero-pad the channels) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm2d(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm2d(norm, cout, groups)
        self.reshape = stride != 1 or cin != cout
        self.pad = shortcut == "pad"
        self.stride, self.extra = stride, cout - cin
        if self.reshape and not self.pad:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if not self.reshape:
            skip = x
        elif self.pad:
            skip = x[..., :: self.stride, :: self.stride]
            skip = F.pad(skip, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    """A 3×3 stem, stages of basic blocks, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], classes: int,
                 norm: str, groups: int, shortcut: str):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.norm = norm2d(norm, widths[0], groups)
        layers, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, norm, groups, shortcut))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.norm(self.stem(x))))
        return self.fc(out.mean(dim=(-2, -1)))


@MODELS.register("resnet20")
def resnet20(ctx: ModelContext, norm: Norm = "group", norm_groups: Annotated[int, Ge(1)] = 2) -> nn.Module:
    """ResNet-20 for 32×32 images (He et al., 2016, §4.2), option-A shortcuts, 0.27M parameters.

    Args:
        norm: Normalisation after each conv: 'group' (GroupNorm), 'batch' (BatchNorm with
            running statistics), 'layer' (one group) or 'none'.
        norm_groups: Groups of each GroupNorm (fewer where they do not divide the channels).
    """
    c, _, _ = image_shape(ctx, "resnet20")
    return ResNet(c, [16, 32, 64], [3, 3, 3], _require_classes(ctx, "resnet20"), norm, norm_groups, "pad")


@MODELS.register("resnet18")
def resnet18(ctx: ModelContext, norm: Norm = "group", norm_groups: Annotated[int, Ge(1)] = 2) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), 11.2M parameters.

    Args:
        norm: Normalisation after each conv: 'group' (GroupNorm), 'batch' (BatchNorm with
            running statistics), 'layer' (one group) or 'none'.
        norm_groups: Groups of each GroupNorm (fewer where they do not divide the channels).
    """
    c, _, _ = image_shape(ctx, "resnet18")
    return ResNet(c, [64, 128, 256, 512], [2, 2, 2, 2], _require_classes(ctx, "resnet18"), norm, norm_groups, "project")
