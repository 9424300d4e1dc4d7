"""Scale: a population of 1,000,000 clients, 1,000 sampled per round, through the vmap executor.

Cheap model (logistic regression on a 16-feature Gaussian mixture, 2.5 samples per client
on average). Prints resident memory after building the population, its growth over the
rounds, and seconds per round (split into the cohorts' compute, timed at each vectorised
call or CUDA-graph replay, and the rest: the host's bookkeeping and the aggregation), next
to the same run with a 10,000-client population: the per-round memory must not grow with
the rounds, and what differs between the two populations must be the data and its index
(built once), not per-round state.

    python benchmarks/scale.py [--device cpu] [--rounds 20] [--shuffle hash] [--keep-on-device] [--strategy scaffold]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402


def config(clients: int, rounds: int, device: str, shuffle: str = "generator", keep: bool = False,
           strategy: str = "fedavg") -> dict:
    """Returns the scale benchmark's config for a population of `clients`."""
    return {
        "name": "scale",
        "seed": 0,
        "data": {"name": "gaussian_mixture", "num_samples": int(2.5 * clients), "dim": 16, "num_classes": 10,
                 "num_clients": clients, "partition": "iid"},
        "model": {"name": "logreg"},
        "strategy": {"name": strategy},
        "local": {"lr": 0.1, "batch_size": 16, "epochs": 1, "shuffle": shuffle},
        "protocol": {"name": "sync", "clients_per_round": 1000},
        "executor": {"kind": "vmap", "device": device, "keep_on_device": keep},
        "run": {"rounds": rounds, "eval_every": rounds, "progress": False},
    }


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def measure(clients: int, rounds: int, device: str, shuffle: str, keep: bool, strategy: str = "fedavg") -> dict[str, float]:
    """Builds and runs one population; returns memory and timing figures."""
    before = rss_mb()
    t = time.perf_counter()
    run = build(load_config(config(clients, rounds, device, shuffle, keep, strategy)))
    t_build = time.perf_counter() - t
    built = rss_mb()
    warm = build(load_config(config(clients, 2, device, shuffle, keep, strategy)))  # first-call costs (lazy imports) out of the timing
    drive(warm, None, progress=False)
    del warm
    start_rounds = rss_mb()
    ex, spent, computing = run.ctx.executor, [0.0], [0.0]
    real_evaluate = ex.evaluate

    def timing(fn):  # the cohort's compute, timed apart from the host's bookkeeping
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
                return out
            finally:
                computing[0] += time.perf_counter() - t0

        return timed

    if ex.runner is not None:  # static buffers (CUDA graphs): each call copies the inputs in and replays
        ex.runner.run = timing(ex.runner.run)
    else:
        real_cohort_fn = ex._cohort_fn
        ex._cohort_fn = lambda *args, **kwargs: timing(real_cohort_fn(*args, **kwargs))

    def evaluate(*args, **kwargs):  # the two evaluations (start, end) are timed apart from the rounds
        t0 = time.perf_counter()
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    ex.evaluate = evaluate
    t = time.perf_counter()
    rows = drive(run, None, progress=False)
    t_rounds = time.perf_counter() - t - spent[0]
    return {
        "clients": clients, "build_s": t_build, "rss_before": before, "rss_built": built,
        "rss_start": start_rounds, "rss_end": rss_mb(), "s_per_round": t_rounds / rounds, "eval_s": spent[0],
        "compute_ms": 1000 * computing[0] / rounds, "rest_ms": 1000 * (t_rounds - computing[0]) / rounds,
        "accuracy": rows[-1]["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--populations", default="10000,1000000")
    ap.add_argument("--shuffle", default="generator", help="local.shuffle: generator (default) or hash")
    ap.add_argument("--keep-on-device", action="store_true", help="executor.keep_on_device")
    ap.add_argument("--strategy", default="fedavg", help="e.g. scaffold: a client state per client, stored after each round")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}; 1,000 clients per round; "
          f"shuffle {args.shuffle}, keep_on_device {args.keep_on_device}; strategy {args.strategy}")
    print(f"{'population':>10s} {'build s':>8s} {'RSS built MB':>13s} {'RSS start MB':>13s} {'RSS end MB':>11s} {'s/round':>8s} "
          f"{'compute ms':>10s} {'rest ms':>8s} {'2 evals s':>9s} {'accuracy':>9s}")
    for n in (int(p) for p in args.populations.split(",")):
        r = measure(n, args.rounds, args.device, args.shuffle, args.keep_on_device, args.strategy)
        print(f"{n:10d} {r['build_s']:8.1f} {r['rss_built']:13.0f} {r['rss_start']:13.0f} {r['rss_end']:11.0f} "
              f"{r['s_per_round']:8.4f} {r['compute_ms']:10.2f} {r['rest_ms']:8.2f} {r['eval_s']:9.2f} {r['accuracy']:9.4f}",
              flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
