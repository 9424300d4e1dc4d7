"""The vmap executor against the limit: one plain batched training step over the same samples.

Every client holds 64 samples and runs one local epoch of batch 16 (K = 4 SGD steps, lr
0.05) from the same global model. The vmap executor runs the whole cohort through
``executor.run(jobs)``, given the cohort as one `JobBatch` as the synchronous protocol gives
it (stacking, the K vectorised steps, one `Contributions` for the cohort, which the
synchronous and decentralized protocols read as columns); a second column
submits the jobs and fetches each client's one-row `Contributions` with ``result(job_id)``,
as the asynchronous protocols do. The limit trains ONE model for the same K steps on
batches of (clients × 16) samples: the same FLOPs without per-client structure, in the
same precision. Both are timed after warm-up (CUDA graph capture included there),
synchronised, best of several calls; the contenders are timed back to back `--repeats`
times and each ratio is the median of the repeats' ratios (the host's speed drifts between
minutes, and both sides are host-bound for small models). The first column is the ratio
against the best of the limits timed (eager; graphed on CUDA; compiled with
`--compiled-limit`), per repeat; the others follow it.

    python benchmarks/vs_limit.py --device cpu --models mlp --clients 100
    python benchmarks/vs_limit.py --device cuda --models mlp,cnn28,cnn32 --clients 100,1000
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._images import pfl_cnn  # noqa: E402
from fedsim.executors.base import Job, WorkerSpec  # noqa: E402
from fedsim.executors.job_batch import JobBatch  # noqa: E402
from fedsim.executors.precision import precision  # noqa: E402
from fedsim.executors.vmap import VmapExecutor  # noqa: E402
from fedsim.models import ModelContext, cnn  # noqa: E402
from fedsim.strategy import LocalHP, Payload  # noqa: E402
from fedsim.task import Task  # noqa: E402
from fedsim.strategies.fedavg import fedavg  # noqa: E402

SAMPLES, BATCH, LR = 64, 16, 0.05
MODELS: dict[str, tuple[tuple[int, ...], Callable[[], nn.Module]]] = {
    "mlp": ((60,), lambda: nn.Sequential(nn.Linear(60, 200), nn.ReLU(), nn.Linear(200, 10))),
    "cnn28": ((1, 28, 28), lambda: cnn(ModelContext((1, 28, 28), 10, "classification"), [32, 64], 512)),
    "cnn32": ((3, 32, 32), lambda: pfl_cnn((3, 32, 32), 10, dropout=False)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, min_time: float = 1.0, reps: int = 3) -> float:
    """Best wall time of one call over repeats (after two warm-up calls)."""
    for _ in range(2):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 50):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def make_data(shape, n: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n * SAMPLES, *shape), generator=gen)
    y = torch.randint(0, 10, (n * SAMPLES,), generator=gen)
    return x, y


def client_indices(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(c * SAMPLES + rng.permutation(SAMPLES)).reshape(-1, BATCH) for c in range(n)]


def limit_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[np.ndarray], mode: str,
               device: torch.device, graphed: bool, compiled: bool = False) -> Callable[[], None]:
    """One model, K steps of batch n·B over the same samples (the clients' k-th batches);
    `compiled`: the module's forward and backward compiled with torch.compile."""
    module = module.to(device)
    params = [p for p in module.parameters()]
    if compiled:
        module = torch.compile(module, dynamic=False)
    order = np.stack(idx)  # [n, K, B]
    batches = [(x[torch.from_numpy(order[:, k].reshape(-1))].to(device), y[torch.from_numpy(order[:, k].reshape(-1))].to(device))
               for k in range(order.shape[1])]

    def run() -> None:
        with precision(mode, device.type):
            for xb, yb in batches:
                loss = nn.functional.cross_entropy(module(xb), yb)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_add_(params, grads, alpha=-LR)

    if not graphed:
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay() -> None:
        graph.replay()

    replay.keep_alive = run  # type: ignore[attr-defined]  # the batches and parameters the graph reads
    return replay


def vmap_round(module: nn.Module, shape, x, y, idx, device: torch.device, **knobs) -> Callable[[], object]:
    """The vmap executor running the whole cohort from one shared global model."""
    task = Task(module, "classification", {"input_shape": shape})
    ex = VmapExecutor(device=device.type, keep_on_device=device.type == "cuda", **knobs)
    ex.start(WorkerSpec(task, x, y, None, LocalHP(LR), 0), fedavg())
    home = device if device.type == "cuda" else torch.device("cpu")
    payload = Payload(task.initial_params().to(home))
    jobs = [Job(c, c, 0, payload, {}, ix, SAMPLES) for c, ix in enumerate(idx)]
    batch = JobBatch.of(jobs)  # what a synchronous round hands the executor: the jobs as columns
    fn = lambda: ex.run(batch)  # noqa: E731

    def one_by_one() -> list:
        """The asynchronous protocols' way: submit every job, then fetch each one-row Contributions."""
        for job in jobs:
            ex.submit(job)
        return [ex.result(job.job_id) for job in jobs]

    fn.executor = ex  # type: ignore[attr-defined]
    fn.one_by_one = one_by_one  # type: ignore[attr-defined]
    return fn


def replay_only(fn) -> Callable[[], object] | None:
    """The captured CUDA graph of the cohort alone (no stacking, copies or result objects)."""
    runner = fn.executor.runner
    entries = list(runner._entries.values()) if runner is not None else []
    graph = entries[0].graph if len(entries) == 1 else None
    return graph.replay if graph is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--clients", default="100")
    ap.add_argument("--compiled-limit", action="store_true",
                    help="also time the limit with the module compiled (torch.compile), for compiled variants")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds of timing every contender back to back; ratios are medians over them")
    ap.add_argument("--variants", default="auto",
                    help="comma list of precision/graphs/conv[/compile], e.g. fp32/eager/native, tf32/graphs/native/compile")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.variants == "auto":
        variants = ["fp32/eager/native"] if device.type == "cpu" else [
            "fp32/eager/native", "fp32/graphs/native", "tf32/graphs/native", "tf32/graphs/unfold",
            "bf16/graphs/native", "bf16/graphs/unfold"]
    else:
        variants = args.variants.split(",")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {SAMPLES} samples/client, batch {BATCH}, K={SAMPLES // BATCH}")
    header = f"{'model':6s} {'clients':>7s} {'variant':28s} {'vmap / best of the limits':>33s} | {'vmap upd/s':>11s} {'limit upd/s':>12s} {'ratio':>6s} {'graphed limit':>14s} {'ratio':>6s} {'graph only':>12s} {'ratio':>6s}"
    print(header)
    rows = []
    for model in args.models.split(","):
        shape, make = MODELS[model]
        for n in (int(c) for c in args.clients.split(",")):
            x, y = make_data(shape, n, device)
            idx = client_indices(n)
            torch.manual_seed(0)
            base = make()
            limits: dict[tuple, Callable[[], object] | None] = {}  # the limit's step per (mode, graphed/compiled)

            def limit(mode: str, kind: bool | str) -> Callable[[], object] | None:
                if (mode, kind) not in limits:
                    try:
                        limits[(mode, kind)] = limit_step(_copy(base), x, y, idx, mode, device, kind is True,
                                                          compiled=kind == "compiled")
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        print(f"  limit {mode} {kind} failed: {type(exc).__name__}: {exc}"[:300])
                        limits[(mode, kind)] = None
                return limits[(mode, kind)]

            for variant in variants:
                mode, graphs, conv, *rest = variant.split("/")
                compiled = rest == ["compile"]
                kinds: list[bool | str] = [False, True] if device.type == "cuda" else [False]
                if compiled and args.compiled_limit:
                    kinds.append("compiled")
                try:
                    fn = vmap_round(_copy(base), shape, x, y, idx, device, precision_mode=mode,
                                    graphs=graphs == "graphs", conv=conv, compile_cohorts=compiled)
                    replay = None
                except Exception as exc:  # noqa: BLE001
                    print(f"  vmap {variant} failed: {type(exc).__name__}: {exc}"[:300])
                    continue
                # each repeat times every contender once, back to back; ratios are taken within a
                # repeat, and the median over repeats is reported (the host's speed drifts)
                times: dict[str, list[float]] = {}
                try:
                    for _ in range(args.repeats):
                        times.setdefault("vmap", []).append(best_time(fn, device))
                        times.setdefault("objects", []).append(best_time(fn.one_by_one, device))
                        replay = replay if replay is not None else replay_only(fn)
                        if replay is not None:
                            times.setdefault("graph", []).append(best_time(replay, device))
                        for kind in kinds:
                            step = limit(mode, kind)
                            if step is not None:
                                times.setdefault(str(kind), []).append(best_time(step, device))
                except Exception as exc:  # noqa: BLE001
                    print(f"  vmap {variant} failed: {type(exc).__name__}: {exc}"[:300])
                    traceback.print_exc()
                    continue
                finally:
                    fn.executor.close()  # frees its captured graphs' memory pools before the next variant
                    del fn, replay
                    gc.collect()

                def ups(name: str) -> float:
                    return n / float(np.median(times[name])) if name in times else float("nan")

                def ratio(a: str, b: str) -> float:
                    if a not in times or b not in times:
                        return float("nan")
                    return float(np.median([tb / ta for ta, tb in zip(times[a], times[b])]))

                names = {"False": "eager", "True": "graphed", "compiled": "compiled"}
                kinds_timed = [k for k in names if k in times]
                per_repeat = [min(times[k][i] for k in kinds_timed) / t for i, t in enumerate(times["vmap"])]
                fastest = min(kinds_timed, key=lambda k: float(np.median(times[k])))
                row = (f"{model:6s} {n:7d} {variant:28s} vs BEST limit ({names[fastest]}) "
                       f"{float(np.median(per_repeat)):5.2f} | {ups('vmap'):11.0f} {ups('False'):12.0f} "
                       f"{ratio('vmap', 'False'):6.2f} {ups('True'):14.0f} {ratio('vmap', 'True'):6.2f} "
                       f"{ups('graph'):12.0f} {ratio('graph', 'True'):6.2f}")
                row += f"   with per-client objects {ups('objects'):9.0f} ratio {ratio('objects', 'False'):5.2f}"
                if "compiled" in times:
                    row += f"   compiled limit {ups('compiled'):9.0f} ratio {ratio('vmap', 'compiled'):5.2f}"
                if args.repeats > 1:
                    spread = [tb / ta for ta, tb in zip(times["vmap"], times.get("False", []))]
                    row += f"   (ratio over repeats {min(spread):.2f}-{max(spread):.2f})" if spread else ""
                print(row, flush=True)
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print("\n" + header + "\n" + "\n".join(rows))


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


if __name__ == "__main__":
    main()
