"""Host time per client update of an asynchronous run (FedBuff), next to the executor's time.

1,000 clients with 64 samples each (60-feature Gaussian mixture, MLP 60-200-10, one local
epoch of batch 16), FedBuff with a buffer of 100 and 500 jobs in flight, on the vmap
executor. The asynchronous protocol dispatches, times and accepts every job on its own, so
beside the executor's vectorised cohorts it spends host time per job: its keyed draws of
compute time, the choice of idle clients, the job's batch order, its one-row result and
the bookkeeping at each aggregation. Prints the wall time of the aggregations (after the
build), the executor's part of it, and the rest per client update.

    python benchmarks/async_overhead.py [--device cpu] [--aggregations 100] [--shuffle hash]
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


def config(aggregations: int, device: str, clients: int, buffer: int, concurrency: int, shuffle: str = "generator") -> dict:
    """Returns the benchmark's FedBuff config mapping."""
    return {
        "name": "async-overhead",
        "seed": 0,
        "data": {"name": "gaussian_mixture", "num_samples": 80 * clients, "num_clients": clients,
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
    args = ap.parse_args()
    run = build(load_config(config(args.aggregations, args.device, args.clients, args.buffer, args.concurrency,
                                   args.shuffle)))
    spent = [0.0]
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
    rest = wall - spent[0]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; shuffle {args.shuffle}; {args.clients} clients, "
          f"buffer {args.buffer}, concurrency {args.concurrency}, {args.aggregations} aggregations ({updates} updates)")
    print(f"wall {wall:.2f} s = executor {spent[0]:.2f} s + rest {rest:.2f} s; rest per update {rest / updates * 1e6:.0f} us; "
          f"{updates / wall:.0f} updates/s; final test_loss {rows[-1]['test_loss']:.6f}")


if __name__ == "__main__":
    main()
