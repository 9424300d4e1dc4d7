"""Protocols: when things happen (sync rounds; async arrivals; gossip), on the virtual clock."""
from .base import Protocol, ProtocolState, RunContext

__all__ = ["Protocol", "ProtocolState", "RunContext"]
