"""Static-shape replay of a cohort's local update: CUDA graphs on the GPU.

A cohort's whole local update (K steps, forward and backward, for every client) is a few
hundred small kernels; launching them one by one from Python costs more than running them.
`StaticCohortRunner` pads each cohort to a bucketed size, copies its inputs into buffers
that live as long as the runner, and on CUDA captures the call once per shape as a CUDA
graph and replays it. On the CPU it runs the same buffer-and-padding code without capture
(so that path is tested where there is no GPU).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils._pytree import tree_map

from ..strategy import Tensor

CohortFn = Callable[[Tensor, dict, dict, Tensor], Any]  # (params, extras, state, indices) -> outputs


def bucket(n: int) -> int:
    """Returns the padded cohort size: the next power of two up to 16, then multiples of 16."""
    if n <= 16:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 16) * 16


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src, non_blocking=True)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def clone_tree(tree: Any) -> Any:
    """Returns a copy of a tree of tensors (dicts, tuples, lists, registered pytrees such as
    encoded messages)."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tree)


class _Entry:
    def __init__(self, inputs: tuple, outputs: Any, graph: "torch.cuda.CUDAGraph | None", fn: Callable):
        self.inputs, self.outputs, self.graph, self.fn = inputs, outputs, graph, fn


class StaticCohortRunner:
    """Runs cohort functions on static, reused input buffers; replays CUDA graphs on CUDA.

    The outputs it returns are the runner's own buffers: copy them out before the next call
    with the same key.
    """

    def __init__(self, capture: bool, warmup: int = 2):
        self.capture = capture
        self.warmup = warmup
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def run(self, key: Hashable, build_fn: Callable[[], CohortFn], inputs: tuple) -> Any:
        """Runs `build_fn()`'s function on `inputs` (params, extras, state, indices); the
        function is built and (on CUDA) captured the first time `key` is seen."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._make(build_fn(), inputs)
        else:
            _copy_into(entry.inputs, inputs)
        if entry.graph is not None:
            entry.graph.replay()
            return entry.outputs
        return entry.fn(*entry.inputs)

    def _make(self, fn: CohortFn, inputs: tuple) -> _Entry:
        static = clone_tree(inputs)
        if not self.capture:
            return _Entry(static, None, None, fn)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: lazy init, autotuning
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a private memory pool per graph: replays never clobber each other
            outputs = fn(*static)
        return _Entry(static, outputs, graph, fn)

    def clear(self) -> None:
        """Drops every captured graph and buffer."""
        self._entries.clear()
