"""Where a round's time goes: torch.profiler's operator table over a run's rounds.

Runs one of the benchmarks' workloads through fedsim's runner under torch.profiler (CPU
activities, and CUDA ones on a GPU) after a short warm-up run, and prints the round time and
the operators that took most of it, so the "where the time goes" lines of
benchmarks/README.md can be re-measured:

* ``w``: workload W (`_workload.py`, 100 clients, MLP 60-200-10, FedAvg), the vs_flower shape;
* ``scale``: scale.py's 1,000,000-client logistic regression, 1,000 clients per round;
* ``pfl``: pfl_cifar.py's shape (50 clients per round of pfl's simple_cnn; slow on a CPU).

    python benchmarks/round_profile.py [--workload w] [--executor vmap] [--device cpu] [--rounds 40] [--top 15] [--graphs 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402


def workload(name: str, rounds: int, executor: str, device: str) -> dict:
    """Returns the config mapping of workload `name` for `rounds` rounds."""
    if name == "w":
        from benchmarks._workload import workload_w

        extra = {} if executor == "serial" else {"device": device}
        return workload_w(rounds=rounds, executor=executor, **extra)
    if name == "scale":
        from benchmarks.scale import config

        cfg = config(1_000_000, rounds, device, "hash", keep=True)
        cfg["executor"]["kind"] = executor
        if executor != "vmap":
            cfg["executor"] = {"kind": executor}
        return cfg
    if name == "pfl":
        from benchmarks.pfl_cifar import config

        return config(rounds, device, "tf32", "native", False, 0.05)
    raise SystemExit(f"unknown workload {name!r} (w, scale, pfl)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="w", help="w, scale or pfl")
    ap.add_argument("--executor", default="vmap", help="serial or vmap")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--top", type=int, default=15, help="operators to list")
    ap.add_argument("--graphs", type=int, default=0,
                    help="vmap executor.graphs (default 0: a profile of CUDA-graph replays hides the operators)")
    args = ap.parse_args()

    def config(rounds: int) -> dict:
        cfg = workload(args.workload, rounds, args.executor, args.device)
        if args.executor == "vmap":
            cfg["executor"]["graphs"] = bool(args.graphs)
        return cfg

    warm = build(load_config(config(2)))
    drive(warm, None, progress=False)  # lazy imports, allocator, kernels' first calls
    del warm
    run = build(load_config(config(args.rounds)))
    run.ctx.executor.evaluate = lambda *a, **k: {"loss": 0.0, "accuracy": 0.0}  # the rounds alone
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        drive(run, None, progress=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"workload {args.workload}, executor {args.executor}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: {1000 * seconds / args.rounds:.2f} ms/round under the profiler "
          f"({args.rounds} rounds, evaluations left out)")
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
