"""Per-client persistent state (SCAFFOLD's c_i, …), created on first use and kept by client id.

The protocols read a client's state when they dispatch it and write the new state only
when its result is accepted (a straggler's or a dropped client's state is not changed).
"""
from __future__ import annotations

from typing import Iterator

import torch

Tensor = torch.Tensor


class ClientStateStore:
    """In-memory map client id -> {name: tensor}; only clients that participated have an entry."""

    def __init__(self) -> None:
        self._states: dict[int, dict[str, Tensor]] = {}

    def get(self, client: int) -> dict[str, Tensor] | None:
        """Returns the stored state of `client`, or None if it never reported."""
        return self._states.get(client)

    def put(self, client: int, state: dict[str, Tensor]) -> None:
        """Stores `state` as the persistent state of `client` (an empty dict stores nothing)."""
        if state:
            self._states[client] = {k: v.detach() for k, v in state.items()}

    def __contains__(self, client: int) -> bool:
        return client in self._states

    def __len__(self) -> int:
        return len(self._states)

    def clients(self) -> Iterator[int]:
        """Yields the ids of clients that have a stored state."""
        return iter(sorted(self._states))

    def snapshot(self) -> dict[int, dict[str, Tensor]]:
        """Returns every stored state (for checkpoints)."""
        return {c: dict(s) for c, s in self._states.items()}

    def restore(self, snap: dict[int, dict[str, Tensor]]) -> None:
        """Replaces the store's content with a `snapshot()`."""
        self._states = {int(c): dict(s) for c, s in snap.items()}

    def close(self) -> None:
        """Releases resources (nothing to release in memory)."""
