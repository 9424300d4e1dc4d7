"""R seeds of pfl-research's CIFAR-10 benchmark shape: separate runs against one vectorised sweep.

The workload is `pfl_cifar.py`'s (1,000 clients × 50 CIFAR-10-shaped images, 50 clients per
round, one local epoch of batch 10, pfl's simple_cnn, FedAvg, central evaluation every 10
rounds) with seeds 0..R-1 (or, with `--vary lr`, R local learning rates on seed 0). "separate" builds and drives the R runs one after the other,
each on its own vmap executor; "vectorised" drives them together as `fedsim sweep
--vectorize` does (`fedsim/sweep_vectorized.py`): every round of the R runs is one vmap call
over R × 50 clients. No run folders are written on either side. Prints each side's wall
seconds (build + rounds + evaluations, after an untimed 2-round warm-up run), ms per round
and the ratio.

The model has dropout (`executor.randomness: different`), so the vectorised runs draw their
dropout masks per combined call: reproducible, but not equal to the separate runs (without
random layers they are equal to rounding, tests/test_sweep_vectorized.py).

    python benchmarks/vectorized_sweep.py --device cuda [--seeds 4] [--rounds 300] [--precision tf32] [--compile]
    python benchmarks/vectorized_sweep.py --device cuda --vary lr   # R local learning rates instead of R seeds
    python benchmarks/vectorized_sweep.py --device cuda --conv unfold   # convolutions as batched matrix products
    python benchmarks/vectorized_sweep.py --workload w --device cpu --rounds 40 --lr 0.05   # workload W's MLP
    python benchmarks/vectorized_sweep.py --workload quadratic --device cpu --rounds 300     # per-call overhead only
    python benchmarks/vectorized_sweep.py --quick      # a few rounds of a small cohort on the CPU
    python benchmarks/vectorized_sweep.py --workload w --device cuda --processes   # and R worker processes

`--processes` adds a third side: the R runs at once in R worker processes (spawned, each
with its share of the CPU's threads), as `fedsim sweep --workers R` runs them. Each worker
first makes an untimed 2-round run (imports, CUDA context, first launches: a cost a sweep pays
once per worker), then the R runs are timed from their hand-over to the pool to the last one's
end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._workload import workload_w  # noqa: E402
from benchmarks.pfl_cifar import config as pfl_config  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402
from fedsim.sweep_vectorized import run_together, why_not  # noqa: E402


def configs(args: argparse.Namespace) -> tuple[dict, list]:
    """The benchmark's config mapping and the R runs' Configs (seeds 0..R-1)."""
    if args.workload == "quadratic":  # the federated quadratic: 10 clients, 10 full-batch steps of a 5-vector
        base = {"name": "quadratic", "seed": 0,
                "data": {"name": "quadratic", "num_clients": 10, "partition": "natural", "dim": 5},
                "model": {"name": "vector"}, "strategy": {"name": "fedavg"},
                "local": {"lr": args.lr, "batch_size": 1, "steps": 10, "shuffle": args.shuffle},
                "protocol": {"name": "sync"}, "executor": {"kind": "vmap", "device": args.device},
                "run": {"rounds": args.rounds, "eval_every": args.rounds, "progress": False, "partition_plot": False}}
        return base, _vary(base, args)
    if args.workload == "w":  # workload W (MLP 60-200-10, all 100 clients every round)
        base = workload_w(args.rounds, "vmap", device=args.device, precision=args.precision, compile=args.compile)
        base["local"] = {**base["local"], "lr": args.lr, "shuffle": args.shuffle}
        base["run"] = {**base["run"], "eval_every": min(10, args.rounds), "partition_plot": False}
        return base, _vary(base, args)
    base = pfl_config(args.rounds, args.device, args.precision, args.conv, args.device == "cuda", args.lr,
                      args.shuffle, args.compile)
    if args.quick:
        base["data"].update(num_clients=100, num_train=5_000, num_test=500)
        base["protocol"]["clients_per_round"] = 10
        base["run"]["eval_every"] = args.rounds
    return base, _vary(base, args)


def _vary(base: dict, args: argparse.Namespace) -> list:
    """The R runs' Configs: seeds 0..R-1, or R local learning rates lr·2^(i − R/2) on seed 0
    (each job then carries its run's rate)."""
    if args.max_chunk is not None:
        base["executor"] = {**base["executor"], "max_chunk": args.max_chunk}
    if args.device == "cuda":  # the model and its updates stay on the GPU, as docs/sweeps.md advises
        base["executor"] = {**base["executor"], "keep_on_device": True}
    if args.vary == "lr":
        rates = [args.lr * 2.0 ** (i - args.seeds // 2) for i in range(args.seeds)]
        return [load_config({**base, "local": {**base["local"], "lr": lr}}) for lr in rates]
    return [load_config({**base, "seed": seed}) for seed in range(args.seeds)]


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def final(rows: list[dict]) -> float:
    """A run's final test accuracy (its test loss for a task without one)."""
    last = rows[-1]
    return last["test_accuracy"] if last.get("test_accuracy") is not None else last["test_loss"]


def separate(cfgs: list) -> tuple[float, list[float]]:
    """Builds and drives each run alone; returns wall seconds and the final accuracies."""
    t = time.perf_counter()
    accuracies = []
    for cfg in cfgs:
        rows = drive(build(cfg), None, progress=False)
        accuracies.append(final(rows))
    sync()
    return time.perf_counter() - t, accuracies


def vectorised(cfgs: list) -> tuple[float, list[float]]:
    """Builds and drives the runs together, one vmap call per round; returns wall seconds and
    the final accuracies."""
    t = time.perf_counter()
    rows, _ = run_together(cfgs, lambda i, executor: drive(build(cfgs[i], executor=executor), None, progress=False))
    sync()
    return time.perf_counter() - t, [final(r) for r in rows]


_started: list = []  # in a worker: the barrier that every worker of the pool reaches once warm


def _worker_start(warm: dict, threads: int, barrier) -> None:
    """A worker process's start: its torch threads, then an untimed 2-round run."""
    os.chdir(ROOT)
    torch.set_num_threads(threads)
    drive(build(load_config(warm)), None, progress=False)
    _started.append(barrier)


def _worker_ready(_: int) -> int:
    _started[0].wait()  # returns once every worker holds one of these tasks: all started and warm
    return os.getpid()


def _worker_run(cfg: dict) -> float:
    rows = drive(build(load_config(cfg)), None, progress=False)
    sync()
    return final(rows)


def processes(dicts: list[dict], warm: dict) -> tuple[float, list[float]]:
    """Drives the runs at once in one spawned worker process each (started and warmed up
    first, untimed); returns wall seconds from the hand-over to the last run's end, and the
    final accuracies."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from fedsim.sweep import threads_per_worker

    r = len(dicts)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(r, mp_context=spawn, initializer=_worker_start,
                             initargs=(warm, threads_per_worker(r), spawn.Barrier(r))) as pool:
        pids = set(pool.map(_worker_ready, range(r)))
        if len(pids) != r:
            raise RuntimeError(f"{len(pids)} of {r} worker processes started")
        t = time.perf_counter()
        accuracies = list(pool.map(_worker_run, dicts))
        return time.perf_counter() - t, accuracies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=4, help="R, the number of runs (seeds 0..R-1)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--shuffle", default="generator", help="local.shuffle: generator (keyed numpy generators, on the host) or hash (computed with each cohort on the executor's device, separate or vectorised)")
    ap.add_argument("--compile", action="store_true", help="executor.compile: torch.compile each cohort shape")
    ap.add_argument("--conv", choices=("auto", "native", "channels_last", "unfold", "triton"), default="auto",
                    help="executor.conv for the pfl CNN (unfold: convolutions as batched matrix products)")
    ap.add_argument("--max-chunk", type=int, default=None,
                    help="executor.max_chunk: most clients in one vmap call (a vectorised round then makes several)")
    ap.add_argument("--order", choices=("separate-first", "vectorised-first"), default="separate-first")
    ap.add_argument("--workload", choices=("pfl", "w", "quadratic"), default="pfl",
                    help="pfl: pfl_cifar.py's CNN shape; w: workload W (MLP 60-200-10, 100 clients, all per round); "
                         "quadratic: the federated quadratic (10 clients, a 5-vector: almost no compute per call)")
    ap.add_argument("--vary", choices=("seed", "lr"), default="seed",
                    help="what differs between the R runs: the seed (0..R-1) or local.lr (lr·2^(i − R/2), seed 0)")
    ap.add_argument("--processes", action="store_true",
                    help="also run the R runs at once in R worker processes (as fedsim sweep --workers R)")
    ap.add_argument("--quick", action="store_true", help="5,000 images on 100 clients, 10 per round, 3 rounds, 2 seeds (a CPU check)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seeds = min(args.rounds, 3), min(args.seeds, 2)
    os.chdir(ROOT)  # the data and model plugins are imported by module name
    base, cfgs = configs(args)
    reason = why_not(cfgs)
    if reason is not None:
        sys.exit(f"cannot vectorise these runs: {reason}")
    # untimed: a 2-round run of seed 0 pays the process's first-time costs (CUDA context,
    # kernels' first launches, plugin imports), which would otherwise fall on the first side
    warm = {**base, "run": {**base["run"], "rounds": 2, "eval_every": 2}}
    separate([load_config(warm)])
    sides = [("separate", separate), ("vectorised", vectorised)]
    if args.order == "vectorised-first":
        sides.reverse()
    took = {name: fn(cfgs) for name, fn in sides}
    if args.processes:
        took["processes"] = processes([c.resolved() for c in cfgs], warm)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    what = "seeds" if args.vary == "seed" else "local learning rates"
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}; conv {args.conv}; max_chunk {args.max_chunk}; {args.seeds} {what} × "
          f"{args.rounds} rounds of {base['protocol'].get('clients_per_round', 'all')} clients "
          f"(of {base['data']['num_clients']}), evaluation every {base['run']['eval_every']} rounds")
    for side, (secs, accs) in took.items():
        print(f"{side:>10}: {secs:8.2f} s wall, {secs / args.rounds * 1000:8.1f} ms per round of all "
              f"{args.seeds} runs ({secs / (args.rounds * args.seeds) * 1000:.1f} ms per run-round); "
              f"final accuracies (test loss without one) {', '.join(f'{a:.4f}' for a in accs)}")
    ratio = took["separate"][0] / took["vectorised"][0]
    print(f"separate / vectorised: {ratio:.2f}x (R = {args.seeds}: {args.seeds}x would be one run's cost for all)")
    if args.processes:
        print(f"separate / processes: {took['separate'][0] / took['processes'][0]:.2f}x")


if __name__ == "__main__":
    main()
