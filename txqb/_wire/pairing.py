"""
Pairing responses with requests, by position.

libqb matches a response to a request by order alone: the n-th response on
a connection answers the n-th request.  A client that gives up on a request
(cancelled, timed out) must therefore keep its place in the queue, so that
the late response is read and thrown away instead of being handed to the
next request.
"""

from __future__ import annotations

from typing import Deque, Generic, List, Optional, TypeVar

__all__ = ["Slot", "ReplyQueue"]

T = TypeVar("T")


class Slot(Generic[T]):
    """One outstanding request's place in the queue."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: Optional[T]) -> None:
        self.waiter: Optional[T] = waiter

    def abandon(self, _deferred: object = None) -> None:
        """
        Keep the place but drop the waiter: its reply will be discarded.
        Takes (and ignores) an argument, so that it can be a L{Deferred}'s
        canceller, which is called with the Deferred.
        """
        self.waiter = None


class ReplyQueue(Deque[Slot[T]]):
    """
    First-in, first-out queue of waiters for responses.

    Sans-IO: the caller pushes a waiter when a request is sent and pops one
    when a response arrives.  A C{deque} itself, so that its length and
    truth cost no Python call (they are asked for every message).
    """

    def push(self, waiter: T) -> Slot[T]:
        """Append a waiter for the next response not yet claimed."""
        slot = Slot(waiter)
        self.append(slot)
        return slot

    def pop(self) -> Optional[T]:  # type: ignore[override]
        """
        Claim the oldest slot for a response that has just arrived.

        @return: its waiter, or L{None} when that request was abandoned.
        @raise LookupError: no request is outstanding (an unsolicited
            response).
        """
        if not self:
            raise LookupError("response arrived with no request outstanding")
        slot = self.popleft()
        # The slot may outlive this (a waiter's canceller holds it): it
        # must not keep the waiter alive, nor a cycle through it.
        waiter, slot.waiter = slot.waiter, None
        return waiter

    def drain(self) -> List[T]:
        """Empty the queue, returning the waiters still interested."""
        waiters = [slot.waiter for slot in self if slot.waiter is not None]
        self.clear()
        return waiters
