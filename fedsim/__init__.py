"""fedsim: asynchronous federated learning and gossip learning on a virtual clock.

The contract a strategy implements is in `fedsim.strategy`; building blocks in
`fedsim.blocks` (server) and `fedsim.local` (client). Runs are built by `fedsim.runner`
from a config read by `fedsim.config.load_config`.
"""
__version__ = "0.1.0"

from .layout import install_checkout_finder

install_checkout_finder()  # in a checkout, fedsim.strategies / fedsim.topologies are the top-level folders
del install_checkout_finder
