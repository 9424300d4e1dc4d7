"""Host time per client update of an asynchronous run (FedBuff), next to the executor's time.

1,000 clients with 64 samples each (60-feature Gaussian mixture, MLP 60-200-10, one local
epoch of batch 16), FedBuff with a buffer of 100 and 500 jobs in flight, on the vmap
executor. The asynchronous protocol dispatches, times and accepts every job on its own, so
beside the executor's vectorised cohorts it spends host time per job: its keyed draws of
compute time, the choice of idle clients, the job's batch order, its one-row result and
the bookkeeping at each aggregation. Prints the wall time of the aggregations (after the
build), the executor's part of it, the two evaluations' (timed apart: the test set grows
with the population), and the rest per client update. `--clients 1000000 --samples 5`
shows that the rest does not grow with the population (idle clients are drawn from the
busy ones, not found by scanning all of them).

    python benchmarks/async_overhead.py [--device cpu] [--aggregations 100] [--shuffle hash] [--clients 1000] [--samples 80]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.executors.vmap import VmapExecutor  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402


def config(aggregations: int, device: str, clients: int, buffer: int, concurrency: int, shuffle: str = "generator",
           samples: int = 80) -> dict:
    """Returns the benchmark's FedBuff config mapping (`samples` per client, a fifth held out for the test set)."""
    return {
        "name": "async-overhead",
        "seed": 0,
        "data": {"name": "gaussian_mixture", "num_samples": samples * clients, "num_clients": clients,
                 "partition": "iid", "test_fraction": 0.2},
        "model": {"name": "mlp", "hidden": [200]},
        "strategy": {"name": "fedavg"},
        "local": {"lr": 0.05, "batch_size": 16, "epochs": 1, "shuffle": shuffle},
        "system": {"compute": {"name": "lognormal", "mean": 0.01, "sigma": 0.5}},
        "protocol": {"name": "async", "buffer_size": buffer, "concurrency": concurrency},
        "executor": {"kind": "vmap", "device": device},
        "run": {"rounds": aggregations, "eval_every": aggregations, "progress": False, "partition_plot": False,
                "checkpoint_every": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--aggregations", type=int, default=100)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--buffer", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--shuffle", default="generator", help="local.shuffle: generator (default) or hash")
    ap.add_argument("--samples", type=int, default=80,
                    help="samples per client (a fifth held out): fewer for populations of 100,000 clients and more")
    args = ap.parse_args()
    run = build(load_config(config(args.aggregations, args.device, args.clients, args.buffer, args.concurrency,
                                   args.shuffle, args.samples)))
    spent, evaluating = [0.0], [0.0]
    real_evaluate = run.ctx.executor.evaluate

    def evaluate(*a, **k):  # the first and last evaluations (on the whole test set) are timed apart
        t = time.perf_counter()
        try:
            return real_evaluate(*a, **k)
        finally:
            evaluating[0] += time.perf_counter() - t

    run.ctx.executor.evaluate = evaluate
    cohorts = VmapExecutor._run_cohorts

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return cohorts(self, *a, **k)
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - t

    VmapExecutor._run_cohorts = timed
    t = time.perf_counter()
    rows = drive(run, None, progress=False)
    wall = time.perf_counter() - t
    updates = args.aggregations * args.buffer
    rest = wall - spent[0] - evaluating[0]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; shuffle {args.shuffle}; {args.clients} clients, "
          f"buffer {args.buffer}, concurrency {args.concurrency}, {args.aggregations} aggregations ({updates} updates)")
    print(f"wall {wall:.2f} s = executor {spent[0]:.2f} s + 2 evaluations {evaluating[0]:.2f} s + rest {rest:.2f} s; "
          f"rest per update {rest / updates * 1e6:.0f} us; "
          f"{updates / wall:.0f} updates/s; final test_loss {rows[-1]['test_loss']:.6f}")


if __name__ == "__main__":
    main()
