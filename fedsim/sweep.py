"""`fedsim sweep`: the product of override values × seeds as separate runs, in parallel.

Each run gets its own run folder under the sweep folder, named by the overrides that vary
(``local.lr=0.1__strategy.name=fedavg__seed=0``), and is exactly what ``fedsim run CONFIG
OVERRIDES seed=S --out FOLDER`` writes. Runs go to local worker processes (each with its own
torch thread count, so that N runs do not fight over the cores) or to Ray tasks on a cluster
(`fedsim.sweep_ray`). Running the same sweep again skips finished runs, resumes interrupted
ones from their newest checkpoint and starts the others afresh; a failed run is reported with
its error and does not stop the others. At the end the sweep folder holds

* ``sweep.csv``: one row per run (its overrides, seed, status, wall time, error, final metrics);
* ``summary.csv``: the final metrics over the seeds of each combination (mean, std, n).
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import FedsimError, Interrupted

SEP = "__"  # between the key=value parts of a run folder's name
FINISHED = ("summary.json", "final_model.pt", "curves.png")  # written last, in this order, by the runner


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its overrides (in axis order), seed and folder name."""

    values: tuple[tuple[str, str], ...]  # (key, value as written on the command line)
    seed: int
    name: str

    def overrides(self) -> list[str]:
        """The run's overrides as `fedsim run` takes them (the seed last)."""
        return [f"{k}={v}" for k, v in self.values] + [f"seed={self.seed}"]


@dataclass
class Outcome:
    """What became of one run: status done / failed / interrupted, its final metrics row,
    wall time (seconds, the whole run's, over resumes), how it was reached, and the error."""

    run: SweepRun
    status: str
    final: dict[str, Any] = field(default_factory=dict)
    wall_time: float | None = None
    how: str = ""  # ran, resumed, skipped (already finished)
    error: str = ""


def split_values(text: str) -> list[str]:
    """Splits `a,b,[1,2]` on the commas outside brackets and quotes: ['a', 'b', '[1,2]']."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_axes(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parses `key=a,b,c` arguments into (key, values); raises FedsimError (one line) for an
    argument without `=`, an empty value, a key given twice, or `seed` (use --seeds)."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise FedsimError(f"sweep: expected KEY=VALUE[,VALUE...], got {spec!r}")
        if key == "seed":
            raise FedsimError("sweep: give the seeds with --seeds 0,1,2, not as an override")
        if key in (k for k, _ in axes):
            raise FedsimError(f"sweep: {key} is given twice; list its values once, separated by commas")
        values = split_values(text)
        if any(v == "" for v in values):
            raise FedsimError(f"sweep: {key}: empty value in {text!r}")
        axes.append((key, values))
    return axes


def parse_seeds(text: str) -> list[int]:
    """Parses `0,1,2` or a range `0-4` (inclusive) into seeds; FedsimError if not integers."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise FedsimError(f"--seeds: expected integers such as 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FedsimError(f"--seeds: expected distinct integers such as 0,1,2 or 0-4, got {text!r}")
    return seeds


def _safe(text: str) -> str:
    """`text` with the characters awkward in a folder name (/, spaces, quotes, brackets…) as '_'."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def plan(axes: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int]) -> list[SweepRun]:
    """Returns the runs of the product of the axes' values × seeds, the seed varying fastest.
    A folder name shows the keys with more than one value and the seed; FedsimError if two
    runs would get the same folder name."""
    varying = {k for k, vs in axes if len(vs) > 1}
    runs, names = [], {}
    for combo in itertools.product(*(vs for _, vs in axes)):
        values = tuple((k, v) for (k, _), v in zip(axes, combo))
        for seed in seeds:
            name = SEP.join([_safe(f"{k}={v}") for k, v in values if k in varying] + [f"seed={seed}"])
            if name in names:
                raise FedsimError(f"sweep: runs {names[name]} and {list(values)} would share the folder {name}; "
                                  f"give values that differ in letters or digits")
            names[name] = list(values)
            runs.append(SweepRun(values, seed, name))
    return runs


def is_finished(folder: Path) -> bool:
    """True when the runner finished the run in `folder` (its last files are written)."""
    return all((folder / f).is_file() for f in FINISHED)


def _same_config(folder: Path, resolved: Mapping[str, Any]) -> bool:
    import yaml

    try:
        return yaml.safe_load((folder / "config.yaml").read_text()) == resolved
    except (OSError, yaml.YAMLError):
        return False


def run_one(source: str | Mapping[str, Any], run: SweepRun, folder: Path,
            threads: int | None = None, executor: Any = None) -> Outcome:
    """Brings the run in `folder` to its end: skips it when finished, resumes it from its newest
    checkpoint, or starts it (afresh, in a run folder fedsim created or a new one). Never raises
    for the run's own failures: they come back as status 'failed' (or 'interrupted') with
    the one-line error. `threads`: torch intra-op threads for this process; `executor`: runs
    the jobs there instead of on the config's executor (a vectorised group's member)."""
    from .checkpoint import list_checkpoints
    from .config import load_config
    from .runner import execute, resume

    if threads:
        import torch

        torch.set_num_threads(threads)
    how = "ran"
    try:
        config = load_config(source, run.overrides())
        resolved = config.resolved()
        started = (folder / "config.yaml").is_file()
        if started and not _same_config(folder, resolved):
            raise FedsimError(f"{folder} holds a run of another config; remove it or sweep into another --out")
        if started and is_finished(folder):
            how = "skipped"
        elif started and list_checkpoints(folder):
            how = "resumed"
            resume(folder, progress=False, executor=executor)
        else:
            execute(config, folder, overwrite=True, progress=False, executor=executor)
        return finished(run, folder, how)
    except FedsimError as exc:
        status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        return Outcome(run, status, how=how, error=str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - a run's own bug must not stop the sweep
        return Outcome(run, "failed", how=how, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def finished_earlier(source: str | Mapping[str, Any], run: SweepRun, folder: Path) -> Outcome | None:
    """Loads the run's config (FedsimError for a bad value, so the sweep stops before anything
    runs) and returns the run's Outcome when `folder` holds it finished, else None."""
    from .config import load_config

    resolved = load_config(source, run.overrides()).resolved()
    if not is_finished(folder) or not _same_config(folder, resolved):
        return None
    return finished(run, folder, "skipped")


def finished(run: SweepRun, folder: Path, how: str) -> Outcome:
    """Returns the 'done' Outcome of the finished run in `folder` (its summary.json's final
    metrics row and wall time)."""
    import json

    summary = json.loads((folder / "summary.json").read_text())
    return Outcome(run, "done", dict(summary.get("final") or {}), summary.get("wall_time"), how)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """torch threads for each of `workers` processes sharing `cores` (default: this process's)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, workers))


_STOP = False  # in a worker process: the sweep was asked to stop; start no further run


def _worker_stop(signum: int, frame: Any) -> None:
    global _STOP
    _STOP = True


def _worker_init(threads: int) -> None:
    """Worker process start: its own process group (a terminal's Ctrl-C reaches the sweep,
    which passes it on once), its torch thread count, and a SIGINT between runs that
    means: start no further run. During a run, SIGINT makes the run write a checkpoint and stop."""
    import signal

    os.setpgrp()
    signal.signal(signal.SIGINT, _worker_stop)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _worker_run(source: str | Mapping[str, Any], run: SweepRun, folder: Path, threads: int) -> Outcome:
    """`run_one` in a worker process, unless the sweep was asked to stop."""
    global _STOP
    if _STOP:
        return Outcome(run, "not started")
    outcome = run_one(source, run, folder, threads)
    _STOP = _STOP or outcome.status == "interrupted"
    return outcome


class StopRequest:
    """While active (in the main thread), SIGINT and SIGTERM are recorded in `signal` and passed
    on as SIGINT to the processes `pids()` names: the first makes their runs write a checkpoint
    and stop, a second stops them at once."""

    def __init__(self, pids: Callable[[], Iterable[int]]):
        self.pids = pids
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        import signal

        self.signal = signum
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_local(source: str | Mapping[str, Any], runs: Sequence[SweepRun], out: Path, workers: int,
              on_done: Callable[[Outcome], None]) -> tuple[list[Outcome], int | None]:
    """Runs `runs` in `workers` worker processes (spawned, so no state of this process leaks in);
    calls `on_done` as each ends. Returns the outcomes in plan order and the signal that asked
    the sweep to stop (None if none did): runs not started then are 'not started'."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = threads_per_worker(workers)
    outcomes: dict[str, Outcome] = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    stop = StopRequest(lambda: list(getattr(pool, "_processes", None) or {}))
    try:
        with stop:
            pending = {pool.submit(_worker_run, source, r, out / r.name, threads): r for r in runs}
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                if stop.signal is not None:
                    for fut in pending:
                        fut.cancel()  # those not handed to a worker yet
                for fut in done:
                    run = pending.pop(fut)
                    if fut.cancelled():
                        outcome = Outcome(run, "not started")
                    else:
                        try:
                            outcome = fut.result()
                        except BrokenProcessPool:
                            outcome = Outcome(run, "failed", error="its worker process died (killed, or out of memory)")
                    outcomes[run.name] = outcome
                    if outcome.status != "not started":
                        on_done(outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [outcomes[r.name] for r in runs], stop.signal


def run_vectorized(source: str | Mapping[str, Any], runs: Sequence[SweepRun], out: Path,
                   on_done: Callable[[Outcome], None], print_line: Callable[[str], Any]
                   ) -> tuple[list[Outcome], int | None, list[SweepRun]]:
    """Runs the runs in `runs` that can share vmap calls as vectorised groups (the seeds of a
    combination, and combinations that differ only where runs may: `sweep_vectorized.groups`);
    prints one line per run that cannot. Returns the outcomes of the runs it ran, the signal
    that stopped the sweep (None if none did) and the runs left to run separately (all those
    not run once a signal stopped the sweep)."""
    from .config import load_config
    from .sweep_vectorized import groups, run_group

    configs = [load_config(source, r.overrides()) for r in runs]
    shared, alone = groups(configs)
    by_reason: dict[str, list[int]] = {}
    for i, reason in alone.items():
        by_reason.setdefault(reason, []).append(i)
    for reason, members in by_reason.items():
        which = (f"all {len(members)} runs" if len(members) == len(runs) and len(runs) > 1 else
                 f"{len(members)} run{'s' if len(members) > 1 else ''} ({', '.join(runs[i].name for i in members)})")
        print_line(f"sweep: running {which} separately: {reason}")
    ran: list[Outcome] = []
    for members in shared:
        group = [runs[i] for i in members]
        if len(shared) > 1 or len(members) < len(runs):
            print_line(f"sweep: {len(group)} runs share vmap calls: {', '.join(r.name for r in group)}")
        outcomes, stopped = run_group(source, group, out, [configs[i] for i in members], on_done, print_line)
        ran += outcomes
        if stopped is not None:
            done = {o.run.name for o in ran}
            return ran + [Outcome(r, "not started") for r in runs if r.name not in done], stopped, []
    return ran, None, [runs[i] for i in sorted(alone)]


def table(outcomes: Iterable[Outcome], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Returns sweep.csv's rows: run, each override key, seed, status, how, wall_time, error,
    then the final metrics (their union, in first-seen order; wall time only once)."""
    outcomes = list(outcomes)
    metrics: dict[str, None] = {}
    for o in outcomes:
        metrics.update((k, None) for k in o.final if k != "wall_time")
    rows = []
    for o in outcomes:
        row: dict[str, Any] = {"run": o.run.name, **dict(o.run.values), "seed": o.run.seed, "status": o.status,
                               "how": o.how, "wall_time": o.wall_time, "error": o.error}
        row.update({k: o.final.get(k) for k in metrics})
        rows.append(row)
    return rows


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def summarize(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Returns summary.csv's rows: per combination of the override `keys` (in plan order), n
    finished runs and, for each numeric final metric and wall time, its mean and sample std
    over the seeds (std empty for n < 2)."""
    fixed = {"run", "seed", "status", "how", "error", *keys}
    metric_keys = [k for k in (rows[0] if rows else {}) if k not in fixed]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), [])
        if row["status"] == "done":
            groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for combo, members in groups.items():
        row: dict[str, Any] = {**dict(zip(keys, combo)), "n": len(members)}
        for k in metric_keys:
            xs = _numbers(m.get(k) for m in members)
            if not xs:
                continue
            row[f"{k}_mean"] = statistics.fmean(xs)
            row[f"{k}_std"] = statistics.stdev(xs) if len(xs) > 1 else None
        out.append(row)
    return out


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes `rows` as CSV (header: the union of their keys, first-seen order), atomically."""
    from .outputs import write_atomic

    header: dict[str, None] = {}
    for r in rows:
        header.update((k, None) for k in r)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    write_atomic(path, buf.getvalue())


class Progress:
    """The sweep's progress: a line per finished run with runs done / total and the ETA (from
    the runs this invocation ran; skipped runs count as done but not toward the rate)."""

    def __init__(self, total: int, print_line: Callable[[str], Any] = print):
        self.total, self.done, self.ran = total, 0, 0
        self.start = time.perf_counter()
        self.print_line = print_line

    def __call__(self, o: Outcome) -> None:
        self.done += 1
        self.ran += o.how != "skipped"
        left = self.total - self.done
        elapsed = time.perf_counter() - self.start
        eta = f", ETA {elapsed / self.ran * left:.0f} s" if self.ran and left else ""
        if o.status == "done":
            shown = {k: o.final[k] for k in ("round", "test_accuracy", "test_loss", "dist_to_opt")
                     if o.final.get(k) is not None}
            what = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            wall = f" in {o.wall_time:.1f} s" if o.wall_time is not None else ""
            what = f"{'finished earlier' if o.how == 'skipped' else o.how + ' to the end'}{wall}: {what}"
        else:
            what = f"{o.status.upper()}: {o.error}"
        self.print_line(f"[{self.done}/{self.total}{eta}] {o.run.name}: {what}")


def sweep(source: str | Path | Mapping[str, Any], axes: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int],
          out: Path, workers: int = 1, ray_address: str | None = None, cpus_per_run: float = 1.0,
          gpus_per_run: float = 0.0, print_line: Callable[[str], Any] = print,
          vectorize: bool = False) -> list[dict[str, Any]]:
    """Runs the sweep into `out` (see the module docstring), writes sweep.csv and summary.csv
    there and returns sweep.csv's rows. `source`: a config file or mapping. With `ray_address`
    the runs are Ray tasks asking for `cpus_per_run` CPUs and `gpus_per_run` GPUs each;
    otherwise `workers` local processes. With `vectorize`, the runs that can share vmap
    calls (`fedsim.sweep_vectorized.groups`) run together in this process, one call per
    round; the others run as before, after one line saying why. Raises FedsimError before
    anything runs for a bad axis, seed list or config value."""
    source = str(Path(source).resolve()) if isinstance(source, (str, Path)) else dict(source)
    runs = plan(axes, seeds)
    keys = [k for k, _ in axes]
    if workers < 1:
        raise FedsimError(f"--workers: must be >= 1 (got {workers})")
    if vectorize and ray_address is not None:
        raise FedsimError("--vectorize runs the runs in this process; drop --ray-address")
    earlier = {r.name: finished_earlier(source, r, out / r.name) for r in runs}
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(runs), print_line)
    for o in filter(None, earlier.values()):
        progress(o)
    todo = [r for r in runs if earlier[r.name] is None]
    ran, stopped = [], None
    if vectorize and todo:
        ran, stopped, todo = run_vectorized(source, todo, out, progress, print_line)
    if not todo or stopped is not None:
        pass
    elif ray_address is not None:
        from .sweep_ray import run_on_ray

        ran, stopped = run_on_ray(source, todo, out, ray_address, cpus_per_run, gpus_per_run, progress)
    else:
        rest, stopped = run_local(source, todo, out, min(workers, len(todo)), progress)
        ran += rest
    by_name = {**{n: o for n, o in earlier.items() if o is not None}, **{o.run.name: o for o in ran}}
    outcomes = [by_name[r.name] for r in runs]
    rows = table(outcomes, keys)
    write_csv(out / "sweep.csv", rows)
    write_csv(out / "summary.csv", summarize(rows, keys))
    failed = [o for o in outcomes if o.status != "done"]
    line = (f"{len(outcomes) - len(failed)}/{len(outcomes)} runs done"
            + (f", {len(failed)} not ({', '.join(sorted({o.status for o in failed}))}); run the same sweep "
               f"again to resume them" if failed else "")
            + f"; wrote {out / 'sweep.csv'} and {out / 'summary.csv'}")
    if stopped is not None:
        import signal

        raise Interrupted(f"sweep stopped by {signal.Signals(stopped).name}: {line}")
    print_line(f"sweep: {line}")
    return rows
