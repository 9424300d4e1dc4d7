"""fedsim's ClientApp for Flower's standard messages: the node's own fedsim config is the
fedsim.yaml next to this file (data, model, local training of each partition)."""
from pathlib import Path

from fedsim.flower import client_app

app = client_app(config=Path(__file__).with_name("fedsim.yaml"))
