"""Flower adapters: a fedsim config, unchanged, on a Flower deployment.

The only package of fedsim that imports ``flwr``, and a transport only: `server_app` runs
the config's own protocol on the wall clock with jobs sent to the SuperNodes
(`FlowerExecutor`); `client_app` runs the strategy's client part on each SuperNode.
`fedsim.flower.apps` holds ready-made instances for a Flower app's ``pyproject.toml``;
docs/flower.md shows how to run them. Both speak Flower's message convention as well: the
ServerApp trains ordinary Flower ClientApps (`fedsim.flower.scaffold_client` is SCAFFOLD's
client part for them), and Flower's own strategies can drive the ClientApp.
"""
from .client import client_app
from .server import deployment_config, run_on_grid, server_app

__all__ = ["client_app", "deployment_config", "run_on_grid", "server_app"]
