"""fedsim vs Flower's simulation engine on workload W, side by side from one run.

Workload W (`_workload.py`): 100 clients × 64 samples, MLP 60-200-10, one local epoch of
batch 16 (4 SGD steps, lr 0.05), FedAvg over all clients, 20 rounds. Every variant trains
from the same initial weights on the same batches (fedsim's keyed batch order), so the
final accuracies agree. Each variant runs in its own process (start-up and teardown
included in "end to end"); peak memory is the largest sum of resident memory over the
process and all its children (Ray's raylet, GCS and workers for Flower), sampled every
0.1 s.

* Flower 1.42: ``flwr.simulation.run_simulation`` with a ServerApp running the message
  API's FedAvg (``strategy.start``) and the ClientApp of ``_flower_w.py`` (imported by
  reference, data loaded once per actor), Ray backend, with its default client resources
  and with ``num_cpus: 1`` per client (the best setting found here).
* fedsim: serial, ray and vmap executors with torch's default thread count; the vmap
  executor again with ``run.torch_threads: 1`` (Ray sets each Flower client actor's thread
  count to its num_cpus the same way), and both with ``executor.compile: true``.

Every Ray started here (Flower's and fedsim's) listens on 127.0.0.1 only (each variant's
process gets Ray's single-machine mode, fedsim.executors.ray_cluster.LOOPBACK_ENV).

    python benchmarks/vs_flower.py [--rounds 20]
"""
from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR, BATCH = 0.05, 16


# ---- children: one variant each, printing one JSON line ------------------------------------

def _fedsim_child(kind: str, rounds: int, threads: int | None = None, compiled: bool = False) -> dict:
    from benchmarks._timing import record_round_ends
    from benchmarks._workload import workload_w
    from fedsim.config import load_config
    from fedsim.runner import build, drive

    cfg = workload_w(rounds, kind, **({"device": "cpu", "compile": compiled} if kind == "vmap" else {}))
    if threads:
        cfg["run"]["torch_threads"] = threads
    run = build(load_config(cfg))
    stamps = record_round_ends(run, time.time)  # wall clock: compared across processes
    start = time.time()
    rows = drive(run, None, progress=False)
    return {"round_ends": [start] + stamps[:rounds], "accuracy": rows[-1]["test_accuracy"]}


def _flower_child(rounds: int, num_cpus: float | None) -> dict:
    import copy

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from benchmarks._flower_w import client_app, workload

    w = workload(rounds)
    task, src, n = w["task"], w["data"].source, w["data"].num_clients
    stamps: list[float] = []
    final: dict = {}
    server_app = ServerApp()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.time())
        if server_round == rounds:
            model = copy.deepcopy(task.module)
            model.load_state_dict(arrays.to_torch_state_dict())
            params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            final["accuracy"] = task.evaluate(params, src.x_test, src.y_test)["accuracy"]
        return MetricRecord({})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(task.module.state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({}), evaluate_fn=evaluate)

    backend = {"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0}} if num_cpus else None
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend)
    # stamps[0] is strategy.start's evaluation of the initial model (round 0)
    return {"round_ends": stamps[: rounds + 1], "accuracy": final.get("accuracy")}


# ---- parent: run each variant, sample memory, print the table ----------------------------------

def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_variant(args: list[str]) -> dict:
    """Runs one variant in a child process; returns its JSON result plus wall time and peak RSS."""
    from fedsim.executors.ray_cluster import LOOPBACK_ENV

    start = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **LOOPBACK_ENV, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - start
    sampler.join()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or ["?"])[-1][:200], "wall": wall}
    res = json.loads(lines[-1])
    res.update(wall=wall, peak_mb=peak[0] / 2**20, start=start)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        kind = args.child[0]
        if kind == "flower":
            res = _flower_child(args.rounds, float(args.child[1]) if len(args.child) > 1 else None)
        else:
            threads = int(args.child[1]) if len(args.child) > 1 and args.child[1] != "0" else None
            res = _fedsim_child(kind, args.rounds, threads, "compile" in args.child[2:])
        res["t0"] = T0
        print(json.dumps(res), flush=True)
        if kind != "flower":  # exit as the `fedsim` command does
            from fedsim.cli import skip_final_collection

            skip_final_collection()
        return
    from fedsim.registry import EXECUTORS

    variants = [("Flower, default client resources", ["flower"]), ("Flower, num_cpus=1 per client", ["flower", "1"]),
                ("fedsim serial executor", ["serial"])]
    if "ray" in EXECUTORS.names():
        variants.append(("fedsim ray executor", ["ray"]))
    variants.append(("fedsim vmap executor (CPU)", ["vmap"]))
    # Ray sets each Flower client actor's OMP_NUM_THREADS to its num_cpus (default 2, or 1); fedsim's
    # process uses torch's default (one thread per core), which loses badly when other work shares the cores
    variants.append(("fedsim vmap, run.torch_threads=1", ["vmap", "1"]))
    # torch.compile of the cohort function: faster steps, after a one-off compile of ~20 s
    variants.append(("fedsim vmap, compile", ["vmap", "0", "compile"]))
    variants.append(("fedsim vmap, compile, torch_threads=1", ["vmap", "1", "compile"]))
    n, r = 100, args.rounds
    print(f"workload W: {n} clients, {r} rounds, MLP 60-200-10, 4 local steps; {os.cpu_count()} CPUs")
    head = (f"{'variant':34s} {'end to end s':>12s} {'round 1 done s':>14s} {'s/round (steady)':>16s} "
            f"{'client-updates/s':>16s} {'peak MB':>8s} {'accuracy':>9s}")
    rows, results = [], {}
    for name, child in variants:
        res = run_variant([*child, "--rounds", str(r)])
        results[name] = res
        if "error" in res:
            rows.append(f"{name:34s} failed: {res['error']}")
            print(rows[-1], flush=True)
            continue
        ends = res["round_ends"]
        steady = (ends[-1] - ends[len(ends) // 4]) / (len(ends) - 1 - len(ends) // 4)  # last 3/4 of rounds
        startup = ends[1] - res["start"]  # process start to the end of round 1
        acc = res["accuracy"]
        rows.append(f"{name:34s} {res['wall']:12.1f} {startup:14.1f} {steady:16.4f} {n / steady:16.0f} "
                    f"{res['peak_mb']:8.0f} {acc if acc is None else round(acc, 4)!s:>9s}")
        print(rows[-1], flush=True)
    print("\n" + head + "\n" + "\n".join(rows))
    base = results.get("Flower, default client resources", {})
    best = results.get("Flower, num_cpus=1 per client", {})
    def sr(x):
        e = x["round_ends"]
        return (e[-1] - e[len(e) // 4]) / (len(e) - 1 - len(e) // 4)

    for label in ("fedsim vmap executor (CPU)", "fedsim vmap, run.torch_threads=1", "fedsim vmap, compile",
                  "fedsim vmap, compile, torch_threads=1"):
        vm = results.get(label, {})
        if not all("round_ends" in x for x in (base, best, vm)):
            continue
        print(f"\n{label} vs Flower default: {sr(base) / sr(vm):.0f}x steady-state throughput, "
              f"{base['wall'] / vm['wall']:.1f}x end to end (targets: 40x, 15x)")
        print(f"{label} vs Flower num_cpus=1: {sr(best) / sr(vm):.0f}x steady-state, "
              f"{best['wall'] / vm['wall']:.1f}x end to end")


if __name__ == "__main__":
    main()
