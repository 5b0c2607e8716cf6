"""
Whether anything but one descriptor wants the reactor now.

libqb's dispatcher reads a connection's requests in batches (5 at
``QB_IPCS_RATE_NORMAL``) and goes back to its poll loop between them, so
that every other descriptor and timer gets its turn.  In C a turn of that
loop costs about a microsecond, so a connection that is alone with work is
read back to back at little cost.  A turn of a Twisted reactor costs 7 to
20 microseconds in Python (its timers, its dispatch around each ready
descriptor, the system call), which made the batch boundary, not the
requests, most of a lone busy connection's cost.

A L{ReactorPeek} looks at the reactor's own readiness set with a zero
timeout, which takes nothing from it (the reactors register level
triggered), and at its timers.  When the only ready descriptor is the
caller's own and no timer is due, a turn of the reactor would come straight
back to the caller, so the caller may read its next batch at once.  Any
other ready descriptor, a due timer or a C{callFromThread} (it wakes the
reactor's waker descriptor) ends the run of batches, so fairness between
connections, and to everything else the reactor serves, stays libqb's.

Only reactors whose set is a C{select.epoll} or C{select.poll} can be
looked at; on others (select, asyncio, test clocks) L{ReactorPeek.alone}
is always false and every batch takes a turn, as before.
"""

from __future__ import annotations

import select
from typing import Any, Callable, List, Optional, Tuple, cast

from txqb._reactor.perreactor import PerReactor

__all__ = ["ReactorPeek", "reactorPeekFor", "MAX_RUN"]

MAX_RUN = 10
"""
Batches one caller reads back to back at most before it takes a turn of
the reactor anyway: a bound on how long anything the peek cannot see (a
reactor's own housekeeping) waits.
"""

_POLL_TYPE: Optional[type] = type(select.poll()) if hasattr(select, "poll") else None


class ReactorPeek:
    """The readiness of one reactor, looked at without taking it."""

    def __init__(self, reactor: Any) -> None:
        poller = getattr(reactor, "_poller", None)
        self._poll: Optional[Callable[..., List[Tuple[int, int]]]] = None
        self._epoll = False
        if hasattr(select, "epoll") and isinstance(poller, select.epoll):
            self._poll, self._epoll = poller.poll, True
        elif _POLL_TYPE is not None and isinstance(poller, _POLL_TYPE):
            self._poll = cast(Any, poller).poll
        timeout = getattr(reactor, "timeout", None)
        self._timeout: Optional[Callable[[], Optional[float]]] = (
            timeout if callable(timeout) else None
        )
        if self._timeout is None:
            self._poll = None

    @property
    def works(self) -> bool:
        """Whether this reactor can be looked at (else L{alone} is false)."""
        return self._poll is not None

    def alone(self, fd: int) -> bool:
        """
        Whether descriptor C{fd} (ready or not) is all that wants the
        reactor: no other descriptor is ready and no timer is due.
        """
        poll = self._poll
        if poll is None:
            return False
        assert self._timeout is not None
        due = self._timeout()
        if due is not None and due <= 0:
            return False
        # Two events are enough to know: a descriptor appears once.
        ready = poll(0, 2) if self._epoll else poll(0)
        for other, _ in ready:
            if other != fd:
                return False
        return True


reactorPeekFor = PerReactor(ReactorPeek)
"""The L{ReactorPeek} of a reactor, made on first use."""
