"""The fedsim ServerApp's own knobs, read from Flower's run config.

They live in the app's ``pyproject.toml`` under ``[tool.flwr.app.config]`` and can be
changed per run with ``flwr run . -c 'reply-timeout=60'``. Everything about the experiment
itself — data, model, strategy, local training, the protocol and its settings (sync rounds,
FedBuff's buffer, FedFix's window…), rounds — is in the fedsim config file the ``config``
key names, exactly as for ``fedsim run``; these knobs only say how the deployment reaches it.

Flower's usual run-config keys set the fedsim config's matching keys (applied before the
``overrides``): `FLOWER_KEYS`. Any other run-config key is the user's own: it is not rejected but passed through, in every
train message's ``config`` record, to the ClientApp (a Flower user's ClientApp reads its own
settings there). A key that looks like a misspelt knob (``reply-timout``) is still refused.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from ..config import Gt, OneOf
from ..config.components import dataclass_knobs, validate_knobs
from ..config.schema import knob


EVALUATIONS = ("server", "federated", "both")

FLOWER_KEYS = {  # Flower's usual run-config key -> the fedsim config key it sets
    "num-server-rounds": "run.rounds",
    "fraction-train": "protocol.fraction",
    "lr": "local.lr",
    "local-epochs": "local.epochs",
    "local-steps": "local.steps",
    "batch-size": "local.batch_size",
}


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
    evaluation: Annotated[str, OneOf(EVALUATIONS)] = knob(
        "server", "Where the global model is evaluated: 'server' (the config's test set, built on the server), "
        "'federated' (Flower evaluate messages to every node, metrics weighted by num-examples; the server "
        "builds no dataset at all), or 'both'.")
    input_shape: str = knob("", "With evaluation='federated': the shape of one model input, space-separated "
                                "(e.g. '20' or '1 28 28'), from which the server builds the model.")
    num_classes: int = knob(0, "With evaluation='federated': the number of classes (the model's outputs).")
    resume: bool = knob(False, "Continue the run in out-dir from its newest checkpoint (run.checkpoint_every), with "
                               "the config it saved: synchronous protocol, strategies without client state.")
    # not a knob: the run config's other keys, as given, for the ClientApp
    passthrough: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False)


def knobs() -> list:
    """Returns the ServerApp's own run-config knobs."""
    return [k for k in dataclass_knobs(FlowerSettings) if k.name != "passthrough"]


def read_settings(run_config: Mapping[str, Any]) -> FlowerSettings:
    """Validates Flower's run config into FlowerSettings (its other keys go to `passthrough`);
    raises ConfigError naming the key."""
    names = [k.name for k in knobs()]
    own, other = {}, {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in names or key in FLOWER_KEYS:
            own[name] = value
        elif difflib.get_close_matches(name, names, n=1, cutoff=0.85):
            own[name] = value  # a misspelt knob: validate_knobs names it and suggests the knob
        else:
            other[str(key)] = value
    mapped = [f"{FLOWER_KEYS[k]}={_override_value(v)}" for k, v in run_config.items() if k in FLOWER_KEYS]
    for k in FLOWER_KEYS:
        own.pop(k.replace("-", "_"), None)
    values = validate_knobs("run-config", own, knobs(), "the fedsim ServerApp")
    values["overrides"] = " ".join([*mapped, values["overrides"]]).strip()
    return FlowerSettings(**values, passthrough=tuple(sorted(other.items())))


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
