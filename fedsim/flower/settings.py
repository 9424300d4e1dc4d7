"""The fedsim ServerApp's own knobs, read from Flower's run config.

They live in the app's ``pyproject.toml`` under ``[tool.flwr.app.config]`` and can be
changed per run with ``flwr run . -c 'mode="async" buffer-size=3'``. Everything about the
experiment itself (data, model, strategy, local training, rounds) is in the fedsim config
file the ``config`` key names; these knobs only say how the deployment runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from ..config import Ge, Gt, OneOf
from ..config.components import dataclass_knobs, validate_knobs
from ..config.schema import knob
from ..protocols.weighting import IMPORTANCES, WEIGHTINGS


@dataclass(frozen=True)
class FlowerSettings:
    """Flower run config keys of the fedsim ServerApp (dashes in TOML, underscores here)."""

    config: str = knob("fedsim.yaml", "The fedsim config file, relative to the app folder (or absolute).")
    overrides: str = knob("", "Space-separated key.path=value overrides applied to that config.")
    mode: Annotated[str, OneOf(("sync", "async"))] = knob(
        "sync",
        "'sync': the config's sync protocol (rounds, client sampling, deadline in wall-clock "
        "seconds); 'async': buffered asynchronous aggregation on wall-clock time (below).",
    )
    out_dir: str = knob("", "Run folder (default runs/flower-<name>-<timestamp>, in the ServerApp's working folder).")
    concurrency: Annotated[int, Ge(0)] = knob(0, "async: clients training at any time (0: all clients).")
    buffer_size: Annotated[int, Ge(1)] = knob(
        1, "async: aggregate every K arrivals (1: asynchronous FedAvg; K > 1: FedBuff). Ignored with a window."
    )
    window: Annotated[float, Ge(0)] = knob(
        0.0, "async: aggregate every this many wall-clock seconds over whoever arrived (FedFix); 0: off."
    )
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = knob(
        "identical",
        "async: aggregation weights: 'identical' (1/|S|), 'samples' (n_i / Σ n_j), 'unbiased' "
        "(p_i / f_i with f_i estimated as 1 / (staleness + 1), exact for FedFix).",
    )
    client_weights: Annotated[str, OneOf(IMPORTANCES)] = knob("samples", "async: client importance p_i for 'unbiased'.")
    node_timeout: Annotated[float, Gt(0)] = knob(300.0, "Seconds to wait until every partition has a SuperNode.")
    reply_timeout: Annotated[float, Gt(0)] = knob(3600.0, "Seconds after which a job that did not come back is lost.")
    poll_interval: Annotated[float, Gt(0)] = knob(0.05, "Seconds between two pulls of replies from the SuperLink.")


def read_settings(run_config: Mapping[str, Any]) -> FlowerSettings:
    """Validates Flower's run config into FlowerSettings; raises ConfigError naming the key."""
    raw = {str(k).replace("-", "_"): v for k, v in run_config.items()}
    return FlowerSettings(**validate_knobs("run-config", raw, dataclass_knobs(FlowerSettings), "the fedsim ServerApp"))
