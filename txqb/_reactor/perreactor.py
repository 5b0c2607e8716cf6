"""One object per reactor, made on first use and gone with the reactor."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Generic, TypeVar

__all__ = ["PerReactor"]

T = TypeVar("T")


class PerReactor(Generic[T]):
    """
    C{make(reactor)}'s result for each reactor, kept as long as the
    reactor lives: the state its connections share (the turn's end, the
    reader hub, the readiness peek), without a global that would outlive
    a test's reactor or mix two reactors' connections.
    """

    def __init__(self, make: Callable[[Any], T]) -> None:
        self._make = make
        self._made: "weakref.WeakKeyDictionary[Any, T]" = weakref.WeakKeyDictionary()

    def __call__(self, reactor: Any) -> T:
        """The object of C{reactor}."""
        try:
            return self._made[reactor]
        except KeyError:
            made = self._made[reactor] = self._make(reactor)
            return made
