"""
Many readers behind one descriptor of the reactor.

A server with many connections is woken for their requests one descriptor
at a time, and Twisted's reactors pass every ready descriptor through
their dispatch (a logging context, a context tracker, the disconnect
checks) before its C{doRead} runs: in Python, that costs about as much as
reading and answering a small request.  A L{ReaderHub} holds such readers
in an epoll set of its own and is itself one reader of the reactor: when
any of them is ready, the reactor calls the hub once, one
``epoll_wait(0)`` names every ready reader, and the hub calls their
C{doRead}s directly, treating what they return or raise as the reactor
would.  With one reader ready it costs one more system call; with several
ready at once (many clients), it saves the reactor's dispatch for all but
one.

The hub needs nothing of the reactor but L{IReactorFDSet}, so it works on
every reactor (an epoll descriptor is readable to ``select``, ``poll`` and
asyncio alike).  It is registered only while it holds a reader: an idle
reactor has neither its descriptor nor its reader.
"""

from __future__ import annotations

import select
from typing import Any, Dict, List, Optional, Protocol as TypingProtocol

from twisted.internet import main
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._reactor.perreactor import PerReactor

__all__ = ["ReaderHub", "Readers", "readerHubFor"]

log = Logger()

_IN = select.EPOLLIN if hasattr(select, "epoll") else 0
_GONE = (select.EPOLLHUP | select.EPOLLERR) if hasattr(select, "epoll") else 0


class Readers(TypingProtocol):
    """What drives a descriptor's reads: a reactor, or a L{ReaderHub}."""

    def addReader(self, reader: IReadDescriptor) -> None:
        """Call C{reader.doRead} whenever it is readable."""

    def removeReader(self, reader: IReadDescriptor) -> None:
        """Stop calling C{reader}."""


@implementer(IReadDescriptor)
class ReaderHub:
    """
    Readers of one reactor that share its attention (see the module
    docstring): C{addReader} and C{removeReader} as the reactor has them,
    for descriptors whose reads this hub drives.

    A few readers are cheaper in the reactor itself (the hub's second
    ``epoll_wait`` costs more than the dispatch it saves when one is
    ready at a time): the hub hands its readers to the reactor while it
    has fewer than L{GATHER_FROM}, takes them all into its set once it
    has that many, and gives them back once they are down to L{SCATTER_AT}.

    Readers in the set are called in the order the kernel reports them,
    at most L{MAX_EVENTS} per turn of the reactor; the rest stay ready
    and are called on the next turn, so one turn stays bounded.
    """

    MAX_EVENTS = 256
    """Readers called per turn of the reactor at most."""

    GATHER_FROM = 4
    """Readers from which the hub holds them in its own set."""

    SCATTER_AT = 2
    """Readers at which the hub gives them back to the reactor."""

    def __init__(self, reactor: IReactorFDSet) -> None:
        self._reactor = reactor
        self._epoll: Optional[Any] = None
        self._byFd: Dict[int, IReadDescriptor] = {}
        self._fds: Dict[IReadDescriptor, int] = {}
        self._direct: Dict[IReadDescriptor, None] = {}

    def addReader(self, reader: IReadDescriptor) -> None:
        """Call C{reader.doRead} whenever it is readable (again)."""
        if reader in self._fds or reader in self._direct or reader.fileno() < 0:
            return
        if self._epoll is None and len(self._direct) + 1 < self.GATHER_FROM:
            self._direct[reader] = None
            self._reactor.addReader(reader)
            return
        if self._epoll is None:
            self._epoll = select.epoll()
            self._reactor.addReader(self)
            direct, self._direct = list(self._direct), {}
            for held in direct:
                self._reactor.removeReader(held)
                self._register(held)
        self._register(reader)

    def _register(self, reader: IReadDescriptor) -> None:
        fd = reader.fileno()
        assert self._epoll is not None
        self._epoll.register(fd, _IN)
        self._byFd[fd] = reader
        self._fds[reader] = fd

    def removeReader(self, reader: IReadDescriptor) -> None:
        """Stop calling C{reader}; the last ones out go back to the reactor."""
        if reader in self._direct:
            del self._direct[reader]
            self._reactor.removeReader(reader)
            return
        if reader not in self._fds:
            return
        fd = self._forget(reader)
        assert self._epoll is not None
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already, which took it out of the set
        if len(self._fds) <= self.SCATTER_AT:
            self._close()  # (the set goes with its descriptor)
            for held in list(self._fds):
                self._forget(held)
                self._direct[held] = None
                self._reactor.addReader(held)

    def _forget(self, reader: IReadDescriptor) -> int:
        fd = self._fds.pop(reader)
        if self._byFd.get(fd) is reader:
            del self._byFd[fd]
        return fd

    def getReaders(self) -> List[IReadDescriptor]:
        """The readers this hub drives now (in its set or the reactor)."""
        return list(self._direct) + list(self._fds)

    @property
    def gathered(self) -> bool:
        """Whether the readers are in the hub's own set now."""
        return self._epoll is not None

    def _close(self) -> None:
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            self._reactor.removeReader(self)
            epoll.close()

    def doRead(self) -> None:
        """Call every ready reader's C{doRead}, as the reactor would."""
        epoll = self._epoll
        if epoll is None:
            return
        try:
            events = epoll.poll(0, self.MAX_EVENTS)
        except InterruptedError:
            return
        byFd = self._byFd
        for fd, event in events:
            reader = byFd.get(fd)
            if reader is None:
                continue  # removed by a reader called before it
            why: Any = None
            try:
                if reader.fileno() != fd:
                    why = main.CONNECTION_LOST  # closed behind the hub's back
                elif event & _GONE and not event & _IN:
                    why = main.CONNECTION_DONE
                else:
                    why = reader.doRead()
            except Exception:
                why = Failure()
                log.failure("reading {reader!r}", why, reader=reader)
            if why:
                self._disconnect(reader, why)

    def _disconnect(self, reader: IReadDescriptor, why: Any) -> None:
        # What the reactor does with a reader whose doRead says it is done.
        self.removeReader(reader)
        self._reactor.removeWriter(reader)  # type: ignore[arg-type]
        reader.connectionLost(why if isinstance(why, Failure) else Failure(why))

    def fileno(self) -> int:
        """The epoll set's descriptor, -1 while the hub holds no reader."""
        return -1 if self._epoll is None else int(self._epoll.fileno())

    def connectionLost(self, reason: Failure) -> None:
        """The reactor let go of the hub (it shuts down): so do its readers."""
        readers = list(self._fds)
        self._fds.clear()
        self._byFd.clear()
        self._close()
        # (Readers in the reactor itself hear of it from the reactor.)
        for reader in readers:
            reader.connectionLost(reason)

    def logPrefix(self) -> str:
        """How the reactor names the hub in its log."""
        return "txqb-readers"


_hubs = PerReactor(ReaderHub)


def readerHubFor(reactor: IReactorFDSet) -> Readers:
    """
    The hub of C{reactor}'s many readers; the reactor itself where there
    is no epoll (the hub is an epoll set).
    """
    if not _IN:
        return reactor
    return _hubs(reactor)
