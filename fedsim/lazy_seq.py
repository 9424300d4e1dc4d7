"""A sequence whose items are built all at once on first access, then kept (`BuiltOnce`).

`fedsim.executors.results.ResultBatch` and `fedsim.messages.MsgBatch` are such sequences: a
consumer that works on their stacked tensors never pays for the per-item objects.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Iterator, Sequence, TypeVar, overload

T = TypeVar("T")


class BuiltOnce(Sequence[T]):
    """Subclasses give `__len__` (without building) and `_build`; indexing and iteration
    build the items once (`built`), and later accesses reuse them."""

    __slots__ = ("_built",)

    def __init__(self) -> None:
        self._built: list[T] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _build(self) -> list[T]:
        """Returns the items, in order (called once)."""

    def built(self) -> list[T]:
        """Returns the items (built on the first call, then kept)."""
        if self._built is None:
            self._built = self._build()
        return self._built

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: Any) -> Any:
        return self.built()[i]

    def __iter__(self) -> Iterator[T]:
        return iter(self.built())
