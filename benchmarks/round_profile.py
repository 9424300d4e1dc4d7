"""Where a round's time goes: torch.profiler's operator table over a run's rounds.

Runs one of the benchmarks' workloads through fedsim's runner under torch.profiler (CPU
activities, and CUDA ones on a GPU) after a short warm-up run, and prints the round time and
the operators that took most of it, so the "where the time goes" lines of
benchmarks/README.md can be re-measured:

* ``w``: workload W (`_workload.py`, 100 clients, MLP 60-200-10, FedAvg), the vs_flower shape;
* ``scale``: scale.py's 1,000,000-client logistic regression, 1,000 clients per round;
* ``pfl``: pfl_cifar.py's shape (50 clients per round of pfl's simple_cnn; slow on a CPU).

With ``--runs R`` (R ≥ 2, vmap executor) the profile is of R runs of the workload, seeds
0..R-1, driven together as ``fedsim sweep --vectorize`` drives them (one vmap call over the
R cohorts per round; `fedsim/sweep_vectorized.py`), and the round time is per round of all R.

    python benchmarks/round_profile.py [--workload w] [--executor vmap] [--device cpu] [--rounds 40] [--top 15] [--graphs 0] [--runs 1]
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
from fedsim.sweep_vectorized import run_together, why_not  # noqa: E402


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
    ap.add_argument("--runs", type=int, default=1,
                    help="R >= 2: profile R runs (seeds 0..R-1) sharing one vmap call per round, as sweep --vectorize does")
    args = ap.parse_args()
    if args.runs > 1 and args.executor != "vmap":
        raise SystemExit("--runs needs --executor vmap")

    def config(rounds: int) -> dict:
        cfg = workload(args.workload, rounds, args.executor, args.device)
        if args.executor == "vmap":
            cfg["executor"]["graphs"] = bool(args.graphs)
        return cfg

    in_calls = [0.0]  # seconds inside the vmap executor's run (the shared calls with --runs)

    def rounds_only(executor) -> None:  # the rounds alone, evaluations left out
        executor.evaluate = lambda *a, **k: {"loss": 0.0, "accuracy": 0.0}

    def time_calls(vmap) -> None:
        inner = vmap.run

        def run(jobs):
            t = time.perf_counter()
            try:
                return inner(jobs)
            finally:
                in_calls[0] += time.perf_counter() - t

        vmap.run = run

    def drive_all(rounds: int) -> None:
        """Builds and drives the workload (R runs together with --runs R) for `rounds` rounds."""
        if args.runs == 1:
            run = build(load_config(config(rounds)))
            rounds_only(run.ctx.executor)
            time_calls(run.ctx.executor)
            drive(run, None, progress=False)
            return
        configs = [load_config({**config(rounds), "seed": seed}) for seed in range(args.runs)]
        reason = why_not(configs)
        if reason is not None:
            raise SystemExit(f"these runs cannot share vmap calls: {reason}")

        def work(i: int, executor) -> None:
            rounds_only(executor)
            if i == 0:
                time_calls(executor.shared.vmap)
            drive(build(configs[i], executor=executor), None, progress=False)

        run_together(configs, work)

    drive_all(2)  # lazy imports, allocator, kernels' first calls
    in_calls[0] = 0.0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        drive_all(args.rounds)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    together = f", {args.runs} runs sharing each vmap call" if args.runs > 1 else ""
    print(f"workload {args.workload}, executor {args.executor}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{together}: {1000 * seconds / args.rounds:.2f} ms/round under the "
          f"profiler ({args.rounds} rounds, build included, evaluations left out), of which "
          f"{1000 * in_calls[0] / args.rounds:.2f} ms in the vmap executor's calls")
    if args.runs > 1 and args.device != "cuda":
        print("(torch.profiler records the calling thread's operators only: the shared calls, which run in this "
              "thread, are in the table below; the runs' own work outside them, in their threads, is not)")
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
