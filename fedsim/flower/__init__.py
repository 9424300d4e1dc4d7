"""Flower adapters: a fedsim strategy, unchanged, in a Flower ServerApp and ClientApp.

The only package of fedsim that imports ``flwr``. `server_app` runs a fedsim config's
server part over a Flower Grid — synchronous rounds (`FlowerSync`) or buffered
asynchronous aggregation on the wall clock (`FlowerAsync`); `client_app` runs the
strategy's client part on each SuperNode. `fedsim.flower.apps` holds ready-made
instances for a Flower app's ``pyproject.toml``; docs/flower.md shows how to run them.
"""
from .client import client_app
from .server import deployment_config, run_on_grid, server_app

__all__ = ["client_app", "deployment_config", "run_on_grid", "server_app"]
