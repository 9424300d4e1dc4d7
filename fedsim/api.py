"""fedsim from Python (a notebook, a script): run a config and get its rows, run a sweep and get its table.

    from fedsim import api
    rows = api.run("experiments/quickstart.yaml", overrides={"run.rounds": 10})
    table = api.sweep("experiments/quickstart.yaml", {"local.lr": [0.05, 0.1]}, seeds=[0, 1], out="runs/lr")

Errors are raised as `fedsim.errors.FedsimError` (one line, naming the config key), as the
command line would print them. See docs/python-api.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

Overrides = Mapping[str, Any] | Sequence[str]


def override_text(value: Any) -> str:
    """Returns a Python value as an override's value text: strings as they are, None as null,
    booleans as true/false, numbers and lists/mappings as JSON (which YAML reads back)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _override_list(overrides: Overrides | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={override_text(v)}" for k, v in overrides.items()]
    return list(overrides)


def _source(config: str | Path | Mapping[str, Any]) -> str | Mapping[str, Any]:
    return str(config) if isinstance(config, (str, Path)) else config


def run(config: str | Path | Mapping[str, Any], overrides: Overrides | None = None, out: str | Path | None = None,
        overwrite: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Runs `config` (a YAML file or a mapping shaped like one) with `overrides` ({"key.path":
    value} or ["key.path=value", ...]) and returns its metrics rows (one dict per evaluation,
    as in metrics.jsonl). With `out`, writes the run folder there (`overwrite`: replace a run
    folder fedsim made); without, nothing is written."""
    from .config import load_config
    from .runner import execute

    cfg = load_config(_source(config), _override_list(overrides))
    result = execute(cfg, Path(out) if out is not None else None, overwrite=overwrite, progress=progress)
    return result.rows


def resume(run_dir: str | Path, progress: bool = False) -> list[dict[str, Any]]:
    """Continues an interrupted run folder from its newest checkpoint; returns all its rows."""
    from .runner import resume as resume_run

    return resume_run(Path(run_dir), progress=progress).rows


def rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Returns the metrics rows of a run folder (its metrics.jsonl)."""
    from .outputs import iter_runs

    ((_, found),) = iter_runs([run_dir])
    return found


def sweep(config: str | Path | Mapping[str, Any], grid: Mapping[str, Sequence[Any]], seeds: Sequence[int] = (0,),
          out: str | Path = "runs/sweep", workers: int = 1, ray_address: str | None = None,
          cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, quiet: bool = False,
          vectorize: bool = False) -> list[dict[str, Any]]:
    """Runs `config` for every combination of the `grid` values ({"key.path": [v1, v2, ...]})
    and every seed, each run in its own folder under `out` (see `fedsim sweep`), in `workers`
    local processes or as Ray tasks on `ray_address`. Returns the table of sweep.csv (one dict
    per run: its overrides, seed, status, wall time, error, final metrics); summary.csv is
    written beside it. Running it again skips the finished runs and resumes interrupted ones.
    `vectorize`: runs that can share vmap calls (seeds, local learning rates, server-side settings) run
    together, one call per round (`--vectorize`)."""
    from .sweep import sweep as run_sweep

    axes = [(k, [override_text(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])]) for k, vs in grid.items()]
    return run_sweep(_source(config), axes, [int(s) for s in seeds], Path(out), workers=workers,
                     ray_address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                     print_line=(lambda _: None) if quiet else print, vectorize=vectorize)


__all__ = ["override_text", "resume", "rows", "run", "sweep"]
