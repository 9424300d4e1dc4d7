"""Engine overhead: fedsim's serial executor vs a plain PyTorch loop doing the same SGD steps.

Both run workload W (benchmarks/_workload.py) from the same initial weights on the same
batches; the script checks that the final models agree and prints the time ratio.
Target (issue 2): fedsim within 1.3× of the plain loop.

    python benchmarks/engine_overhead.py [--rounds 20]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._workload import workload_w  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.data.batching import job_indices  # noqa: E402
from fedsim.rng import numpy_rng  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402


def plain_loop(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[list[np.ndarray]],
               sizes: np.ndarray, lr: float) -> torch.Tensor:
    """Client-by-client FedAvg with torch.optim.SGD; returns the final flat parameters."""
    global_sd = copy.deepcopy(module.state_dict())
    weights = torch.tensor(sizes / sizes.sum(), dtype=torch.float32)
    for round_batches in batches:
        acc = {k: torch.zeros_like(v) for k, v in global_sd.items()}
        for client, idx in enumerate(round_batches):
            module.load_state_dict(global_sd)
            opt = torch.optim.SGD(module.parameters(), lr=lr)
            for row in idx:
                row = row[row >= 0]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(module(x[row]), y[row])
                loss.backward()
                opt.step()
            for k, v in module.state_dict().items():
                acc[k] += weights[client] * v
        global_sd = acc
    return torch.cat([v.reshape(-1) for v in global_sd.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    cfg = load_config(workload_w(args.rounds))
    run = build(cfg)
    data, task = run.ctx.data, run.ctx.task
    module = copy.deepcopy(task.module)
    # the batches fedsim will draw: job ids are round*N + client in the sync protocol
    n = data.num_clients
    batches = [
        [job_indices(data.client_train[c], 16, 1, None, "epoch", False, numpy_rng(cfg.seed, "batches", c, r * n + c))
         for c in range(n)]
        for r in range(args.rounds)
    ]

    t0 = time.perf_counter()
    drive(run, None, progress=False)
    t_fedsim = time.perf_counter() - t0
    x_fedsim = run.protocol.eval_params(run.ctx, run.final_state)

    t0 = time.perf_counter()
    x_plain = plain_loop(module, data.x_train, data.y_train, batches, data.samples_per_client().astype(float), 0.05)
    t_plain = time.perf_counter() - t0

    diff = float((x_fedsim - x_plain).abs().max())
    steps = sum(len(b) for rb in batches for b in rb)
    print(f"workload W: {n} clients, {args.rounds} rounds, {steps} SGD steps, torch threads={torch.get_num_threads()}")
    print(f"{'variant':28s} {'s/round':>9s} {'client-updates/s':>17s}")
    for name, t in (("plain PyTorch loop", t_plain), ("fedsim serial executor", t_fedsim)):
        print(f"{name:28s} {t / args.rounds:9.4f} {n * args.rounds / t:17.0f}")
    print(f"ratio fedsim/plain: {t_fedsim / t_plain:.3f}  (target <= 1.3; eval of 2 rows included in fedsim)")
    print(f"max |x_fedsim − x_plain| = {diff:.2e} (same SGD steps: float32 rounding only)")


if __name__ == "__main__":
    main()
