"""Parameters as flat vectors, with a layout that gives per-tensor views.

All server and gossip math works on 1-D tensors ``[d]`` (or stacks ``[n, d]``): averaging
is one reduction, mixing over a topology one matmul, and the vectorised executor gets
stacked parameters for free. `ParamLayout` remembers the order, names and shapes of the
model's tensors, so that per-tensor quantities (a layer's variance, a norm) stay easy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the tensors packed into a flat parameter vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> "ParamLayout":
        """Returns the layout of a name -> tensor mapping, in its iteration order."""
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return tuple(out)

    @property
    def dim(self) -> int:
        """Total number of scalars d."""
        return sum(self.sizes)

    def slices(self) -> Iterator[tuple[str, slice, tuple[int, ...]]]:
        """Yields (name, slice into the flat vector, shape) for every tensor."""
        start = 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes):
            yield name, slice(start, start + size), shape
            start += size

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns name -> view of `flat` shaped like the tensor (works on [..., d] stacks)."""
        lead = flat.shape[:-1]
        parts = flat.split(self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Packs name -> tensor (same names and shapes) into one flat vector."""
        if tuple(tensors) != self.names:
            missing = set(self.names) ^ set(tensors)
            raise ValueError(f"tensors do not match the layout (differ in: {sorted(missing)})")
        return torch.cat([tensors[n].reshape(-1) for n in self.names])
