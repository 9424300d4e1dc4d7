"""Memory traffic per client-update: the vmap executor's cohort against the limit, op by op.

A small model's vectorised step is bound by memory traffic, not arithmetic: every client
holds its own copy of the parameters, and each pass over them (forward, gradient, flattening
the gradient, the SGD step) moves clients × parameters floats. The limit of vs_limit.py (one
model trained for the same K steps on the clients' batches together) reads its one copy of
the parameters instead. This script counts, for each tensor operation of one cohort call
(`VmapExecutor.run`) and of the limit's K steps, the bytes it reads and writes, assuming every
input is read once and every output written once (views move nothing; a broadcast input is
read once). That is a lower bound on each side's memory traffic, so

    vmap / limit ≤ limit bytes / vmap bytes

for any two implementations that move data equally well. The script prints both sides'
bytes per client-update by operation and that ratio. It counts the same operations on any
device, so the CPU gives the GPU's bound.

    python benchmarks/traffic.py [--models mlp] [--clients 100,1000,10000] [--top 8]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_limit import MODELS, client_indices, limit_step, make_data, vmap_round  # noqa: E402


def _read_bytes(t: torch.Tensor) -> int:
    """Bytes an operation must read from `t`: its elements, at most its storage (broadcasts)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class Traffic(TorchDispatchMode):
    """Counts each operation's bytes read and written (per operation name) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in ins}
        if not func._schema.is_mutable and all(t.untyped_storage().data_ptr() in storages for t in outs):
            return out  # a view or alias (view, _unsafe_view, detach…): nothing moves
        read = sum(_read_bytes(t) for t in ins)
        written = sum(t.numel() * t.element_size() for t in outs)
        self.bytes[func.__name__.split(".")[0]] += read + written
        return out


def counted(fn: Callable[[], Any]) -> Counter[str]:
    """Bytes by operation of one call of `fn`."""
    with Traffic() as traffic:
        fn()
    return traffic.bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--clients", default="100,1000,10000")
    ap.add_argument("--top", type=int, default=8, help="operations listed per side")
    args = ap.parse_args()
    device = torch.device("cpu")
    torch.manual_seed(0)
    for model in args.models.split(","):
        shape, make = MODELS[model]
        for n in [int(c) for c in args.clients.split(",")]:
            x, y = make_data(shape, n, device)
            idx = client_indices(n)
            module = make()
            vmap_fn = vmap_round(module, shape, x, y, idx, device)
            vmap_fn()  # warm-up: lazy set-up inside the executor is not part of a round
            limit = limit_step(make(), x, y, idx, "fp32", device, graphed=False)
            sides = {"vmap": counted(vmap_fn), "limit": counted(limit)}
            total = {k: sum(v.values()) for k, v in sides.items()}
            params = sum(p.numel() for p in module.parameters())
            print(f"{model}, {n} clients, {params:,} parameters, K = {idx[0].shape[0]} steps of batch "
                  f"{idx[0].shape[1]}: bytes per client-update: vmap {total['vmap'] / n / 1e3:,.0f} KB, limit "
                  f"{total['limit'] / n / 1e3:,.0f} KB; bound on vmap / limit at equal bandwidth: "
                  f"{total['limit'] / total['vmap']:.2f}")
            for side, per_op in sides.items():
                top = ", ".join(f"{op} {b / n / 1e3:,.0f}" for op, b in per_op.most_common(args.top))
                print(f"  {side:>5} KB per client-update by operation: {top}")


if __name__ == "__main__":
    main()
