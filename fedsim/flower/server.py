"""The ServerApp: a fedsim config run on a Flower deployment.

It reads the fedsim config named by Flower's run config (`fedsim.flower.settings`) and runs
it exactly as ``fedsim run`` would — the same data, model, strategy and protocol code — with
two things swapped: the wall clock for the virtual one and the SuperNodes (`FlowerExecutor`)
for the config's executor. `fedsim.runner` drives it: the run folder (config.yaml,
metrics.jsonl, events.jsonl, summary.json, final_model.pt, curves.png) is written where the
ServerApp runs, with periodic checkpoints from which run config ``resume`` continues (sync
protocol). With run config ``evaluation="federated"`` the server builds no dataset
(`fedsim.flower.server_data`): the data is on the nodes, and so is the evaluation.
Protocols that exist only in simulation (the decentralized ones) refuse.

A run that fails (a config error, a failing client…) raises out of the ServerApp's main:
Flower then records the run as ``finished:failed`` with fedsim's one-line reason as its
details (``flwr ls --run-id N``). ``flwr run`` itself exits 0 whatever the run's outcome
(Flower 1.42 only submits the run and streams its log); ``fedsim flower-run``
(`fedsim.flower.run_command`) exits non-zero with that reason instead.
"""
from __future__ import annotations

import dataclasses
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, Mapping, Sequence

from flwr.app import Context
from flwr.common.config import get_project_dir
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .. import runner
from ..config import Config, load_config
from ..config.schema import COMPONENTS
from ..errors import ConfigError, FedsimError
from ..outputs import default_run_dir
from ..protocols.clocks import WallClock
from .executor import FlowerExecutor
from .server_data import check_dataless, dataless_data
from .settings import FlowerSettings, read_settings


def deployment_config(source: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Loads a fedsim config for a Flower run: jobs run on the SuperNodes (serial executor
    settings, no Ray), no progress bar."""
    config = load_config(source, overrides)
    serial = COMPONENTS["executor"].resolve("executor", {"kind": "serial"})
    run = dataclasses.replace(config.run, progress=False)
    return dataclasses.replace(config, executor=serial, run=run)


def app_folder(grid: Grid) -> Path:
    """Returns the folder Flower installed this run's app (FAB) in."""
    run = grid.run
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)


def resumable(out_dir: str) -> tuple[Path, Config]:
    """Returns the run folder `out_dir` and the config it saved, for ``resume = true``;
    raises ConfigError at run-config.resume when that run cannot go on from a checkpoint
    on a deployment."""
    from ..checkpoint import list_checkpoints

    out = Path(out_dir)
    if not out_dir or not list_checkpoints(out) or not (out / "config.yaml").is_file():
        raise ConfigError("run-config.resume", f"needs out-dir to name a run folder with a checkpoint (out-dir={out_dir!r})")
    config = deployment_config(out / "config.yaml")
    if config.protocol.name != "sync":
        raise ConfigError("run-config.resume", f"a deployment resumes the sync protocol only (this run is "
                          f"{config.protocol.name!r}: its jobs in flight at the stop are gone)")
    return out, config


def run_on_grid(grid: Grid, config: Config, settings: FlowerSettings) -> runner.Run:
    """Runs `config` over the SuperNodes reachable through `grid` (with ``resume``: continues
    the run in ``out-dir`` from its newest checkpoint, with its saved config); returns the
    finished Run."""
    clock = WallClock(settings.reply_timeout)
    if settings.resume:
        out, config = resumable(settings.out_dir)
    else:
        out = Path(settings.out_dir) if settings.out_dir else default_run_dir(f"flower-{config.name}")
    executor = FlowerExecutor(grid, config, settings, clock)
    data = dataless_data(check_dataless(config, settings), settings) if settings.evaluation == "federated" else None
    log(INFO, "fedsim: %s run of %r, run folder %s", config.protocol.name, config.name, out.resolve())
    if settings.resume:
        run = runner.resume(out, progress=False, clock=clock, executor=executor, data=data)
    else:
        run = runner.execute(config, out, progress=False, clock=clock, executor=executor, data=data)
    last = run.rows[-1]
    log(INFO, "fedsim: done after %d aggregations: test_loss=%.6g test_accuracy=%s",
        last["aggregations"], last["test_loss"], last["test_accuracy"])
    return run


def server_app(config: str | Path | None = None, overrides: Sequence[str] = (),
               run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """Returns a Flower ServerApp running a fedsim config.

    Args:
        config: The fedsim config file; default: the run config's ``config`` key, relative
            to the app folder.
        overrides: key.path=value overrides, applied after the run config's ``overrides``.
        run_config: Defaults for the settings (`FlowerSettings`) under Flower's run config,
            e.g. for ``flwr.simulation.run_simulation``, which has no run config.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            settings = read_settings({**(run_config or {}), **context.run_config})
            source = Path(config) if config is not None else app_folder(grid) / settings.config
            cfg = deployment_config(source, [*settings.overrides.split(), *overrides])
            run_on_grid(grid, cfg, settings)
        except FedsimError as exc:
            # raised on: Flower marks the run finished:failed, with this line as its details
            log(ERROR, "fedsim: error: %s", exc)
            raise

    return app
