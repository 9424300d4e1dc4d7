"""Flower adapters: a fedsim config, unchanged, on a Flower deployment.

The only package of fedsim that imports ``flwr``, and a transport only: `server_app` runs
the config's own protocol on the wall clock with jobs sent to the SuperNodes
(`FlowerExecutor`); `client_app` runs the strategy's client part on each SuperNode.
`fedsim.flower.apps` holds ready-made instances for a Flower app's ``pyproject.toml``;
docs/flower.md shows how to run them.
"""
from .client import client_app
from .server import deployment_config, run_on_grid, server_app

__all__ = ["client_app", "deployment_config", "run_on_grid", "server_app"]
