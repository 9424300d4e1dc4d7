"""Ready-made Flower components, for a Flower app's ``pyproject.toml``::

    [tool.flwr.app.components]
    serverapp = "fedsim.flower.apps:server"
    clientapp = "fedsim.flower.apps:client"

The server reads the fedsim config named by the run config's ``config`` key (see
`fedsim.flower.settings`); clients receive it from the server with every job.
"""
from .client import client_app
from .server import server_app

server = server_app()
client = client_app()
