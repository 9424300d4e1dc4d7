"""The fedsim ServerApp's own knobs, read from Flower's run config.

They live in the app's ``pyproject.toml`` under ``[tool.flwr.app.config]`` and can be
changed per run with ``flwr run . -c 'reply-timeout=60'``. Everything about the experiment
itself — data, model, strategy, local training, the protocol and its settings (sync rounds,
FedBuff's buffer, FedFix's window…), rounds — is in the fedsim config file the ``config``
key names, exactly as for ``fedsim run``; these knobs only say how the deployment reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from ..config import Gt
from ..config.components import dataclass_knobs, validate_knobs
from ..config.schema import knob


@dataclass(frozen=True)
class FlowerSettings:
    """Flower run config keys of the fedsim ServerApp (dashes in TOML, underscores here)."""

    config: str = knob("fedsim.yaml", "The fedsim config file, relative to the app folder (or absolute).")
    overrides: str = knob("", "Space-separated key.path=value overrides applied to that config.")
    out_dir: str = knob("", "Run folder (default runs/flower-<name>-<timestamp>, in the ServerApp's working folder).")
    node_timeout: Annotated[float, Gt(0)] = knob(300.0, "Seconds to wait until every partition has a SuperNode.")
    reply_timeout: Annotated[float, Gt(0)] = knob(
        3600.0, "Seconds a job may take: a round without a deadline, or an asynchronous run with nothing "
        "else to wait for, stops with an error after this long without a reply.")
    poll_interval: Annotated[float, Gt(0)] = knob(0.05, "Seconds between two pulls of replies from the SuperLink.")


def read_settings(run_config: Mapping[str, Any]) -> FlowerSettings:
    """Validates Flower's run config into FlowerSettings; raises ConfigError naming the key."""
    raw = {str(k).replace("-", "_"): v for k, v in run_config.items()}
    return FlowerSettings(**validate_knobs("run-config", raw, dataclass_knobs(FlowerSettings), "the fedsim ServerApp"))
