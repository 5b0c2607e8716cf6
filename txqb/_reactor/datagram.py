"""
A ``SOCK_DGRAM`` unix socket of the ``QB_IPC_SOCKET`` transport, driven by
the reactor.

Each message is one datagram, so the usual byte-stream write buffer does
not fit: this channel keeps a queue of whole datagrams, tries to send each
at once, and only when the socket is full registers as a writer and waits.
It can also connect lazily and retry the connect without blocking, as
libqb's server does with its response and event sockets (it sleeps; txqb
schedules a retry).
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._reactor.hub import Readers
from txqb._reactor.peek import MAX_RUN, reactorPeekFor
from txqb._wire.headers import Buffer, Payload

__all__ = ["DatagramChannel"]

_RETRY_CONNECT = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN})
_GATHER_FROM = 16384
"""
Payloads this large are sent from where they are (``sendmsg``, two
pieces); smaller ones are copied behind the header (one ``send`` costs
less than building the pieces).
"""


@implementer(IReadDescriptor, IWriteDescriptor)
class DatagramChannel:
    """
    One datagram socket: reads whole datagrams, writes whole datagrams.

    @param receiveSize: the largest datagram accepted; a longer one arrives
        truncated to C{receiveSize + 1} bytes so that the caller can tell.
    @param onDatagram: called with each datagram received, as a
        C{memoryview} of the channel's receive buffer that is valid only
        during the call (copy what is kept).
    @param onError: called once with the exception that ended the channel.
    @param peer: when given, the address to connect to lazily before the
        first send, retrying every C{connectInterval} seconds up to
        C{connectTries} times.
    @param batch: datagrams read per wake-up at most, so that one busy
        channel cannot starve the others sharing the reactor.
    @param readers: what drives the reads: the reactor (the default), or
        a L{txqb._reactor.hub.ReaderHub} (a server's many connections).
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        sock: socket.socket,
        receiveSize: int,
        onDatagram: Callable[[Buffer], None],
        onError: Callable[[BaseException], None],
        peer: Optional[bytes] = None,
        connectTries: int = 20,
        connectInterval: float = 0.1,
        batch: int = 64,
        name: str = "qb-dgram",
        readers: Optional[Readers] = None,
    ) -> None:
        self._reactor = reactor
        self._readers: Readers = reactor if readers is None else readers
        self._sock = sock
        self._fd = sock.fileno()
        self._buffer = bytearray(receiveSize + 1)
        self._view = memoryview(self._buffer)
        self._onDatagram = onDatagram
        self._onError = onError
        self._peer = peer
        self._connectTries = connectTries
        self._connectInterval = connectInterval
        self._connectCall: Optional[IDelayedCall] = None
        self._batch = batch
        self._name = name
        self._queue: Deque[Tuple[bytes, Deferred[None]]] = deque()
        self._reading = False
        self._writing = False
        self._reset: Optional[OSError] = None
        self.closed = False
        self.emptyReads = 0
        self._delivering = 0
        self._peek = reactorPeekFor(reactor)

    # IReadDescriptor / IWriteDescriptor

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once closed."""
        return self._fd

    def logPrefix(self) -> str:
        """The channel's name in log lines."""
        return self._name

    @property
    def batch(self) -> int:
        """Datagrams read per wake-up at most (libqb's rate limit)."""
        return self._batch

    @batch.setter
    def batch(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"batch must be positive, not {value}")
        self._batch = value

    def doRead(self) -> None:
        """
        Read up to C{batch} datagrams and hand each over; read further
        batches at once while a turn of the reactor would only come back
        here (L{txqb._reactor.peek}).
        """
        run = 1
        more = self._read(self._batch)
        while more and run < MAX_RUN and self._peek.alone(self._fd):
            run += 1
            more = self._read(self._batch, first=False)

    def drain(self) -> None:
        """Read every datagram already queued, however many."""
        self._read(-1)

    @property
    def reading(self) -> bool:
        """Whether datagrams are being delivered."""
        return self._reading

    def _read(self, limit: int, first: bool = True) -> bool:
        # True when it stopped at C{limit}: there may be more.  (A later
        # batch of one wake-up that finds nothing is no empty read.)
        if self._delivering:
            # Re-entered from a delivery whose view points into our buffer:
            # read into a buffer of this call's own.
            buffer = bytearray(len(self._buffer))
            view = memoryview(buffer)
        else:
            buffer, view = self._buffer, self._view
        sock = self._sock
        while limit != 0:
            limit -= 1
            try:
                n = sock.recv_into(buffer)
            except BlockingIOError:
                if first:
                    self.emptyReads += 1
                reset = self._reset
                if reset is not None:
                    self._fail(reset)
                return False
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ECONNRESET and self._reset is None:
                    # Linux reports the peer's close before the datagrams
                    # it sent are read; read those first, then fail.
                    self._reset = e
                    continue
                self._fail(e)
                return False
            first = False
            # The receiver gets a view of our buffer, valid during the
            # call: it copies what it keeps (see onDatagram).
            chunk = view[:n]
            self._delivering += 1
            try:
                self._onDatagram(chunk)
            finally:
                self._delivering -= 1
                chunk.release()
            if self.closed or not self._reading:
                return False
        return True

    def doWrite(self) -> None:
        """Send queued datagrams until the socket is full again."""
        self._flush()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on this descriptor."""
        self._fail(reason.value or OSError(errno.EBADF, "descriptor lost"))

    # Reading

    def startReading(self) -> None:
        """Have the reactor deliver datagrams."""
        if not self._reading and not self.closed:
            self._reading = True
            self._readers.addReader(self)

    def stopReading(self) -> None:
        """Leave datagrams in the socket (libqb's flow control relies on it)."""
        if self._reading:
            self._reading = False
            self._readers.removeReader(self)

    # Writing

    @property
    def queued(self) -> int:
        """How many datagrams wait for room in the socket."""
        return len(self._queue)

    def send(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """
        Send one datagram made of C{header} and C{payload} (or its parts),
        or queue it behind the ones already waiting.  A large payload, and
        parts, go out with C{sendmsg} from where they are, not copied
        behind the header.

        @return: L{None} when the datagram went out at once (the common,
            cheap case); otherwise a L{Deferred} that fires when it does,
            or fails when the channel dies first.
        @raise OSError: the kernel refused the datagram itself (for
            example ``EMSGSIZE``); nothing was queued.
        """
        if self.closed:
            raise OSError(errno.ENOTCONN, "channel is closed")
        if not self._queue and self._peer is None:
            try:
                if isinstance(payload, tuple):
                    self._sock.sendmsg((header,) + payload)
                elif len(payload) < _GATHER_FROM:
                    self._sock.send(header + payload)
                else:
                    self._sock.sendmsg((header, payload))
                return None
            except (BlockingIOError, InterruptedError):
                pass
        d: Deferred[None] = Deferred()
        if isinstance(payload, tuple):
            self._queue.append((b"".join((header,) + payload), d))
        else:
            self._queue.append((header + payload, d))
        if self._peer is not None:
            if self._connectCall is None:
                self._tryConnect()
        else:
            self._startWriting()
        return d

    def _startWriting(self) -> None:
        if not self._writing and not self.closed:
            self._writing = True
            self._reactor.addWriter(self)

    def _stopWriting(self) -> None:
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)

    def _flush(self) -> None:
        queue, sock = self._queue, self._sock
        while queue:
            data, d = queue[0]
            try:
                sock.send(data)
            except (BlockingIOError, InterruptedError):
                self._startWriting()
                return
            except OSError as e:
                self._fail(e)
                return
            queue.popleft()
            d.callback(None)
            if self.closed:
                return
        self._stopWriting()

    def _tryConnect(self) -> None:
        self._connectCall = None
        assert self._peer is not None
        try:
            self._sock.connect(self._peer)
        except OSError as e:
            self._connectTries -= 1
            if e.errno not in _RETRY_CONNECT or self._connectTries <= 0:
                self._fail(e)
                return
            clock: IReactorTime = self._reactor  # type: ignore[assignment]
            self._connectCall = clock.callLater(
                self._connectInterval, self._tryConnect
            )
            return
        self._peer = None
        self._flush()

    # Ending

    def _fail(self, error: BaseException) -> None:
        if self.closed:
            return
        self.close(error)
        self._onError(error)

    def close(self, reason: Optional[BaseException] = None) -> None:
        """
        Stop, close the socket and fail whatever is still queued.

        @param reason: the exception queued sends fail with.
        """
        if self.closed:
            return
        self.closed = True
        self.stopReading()
        self._stopWriting()
        if self._connectCall is not None:
            self._connectCall.cancel()
            self._connectCall = None
        self._fd = -1
        self._sock.close()
        queue, self._queue = self._queue, deque()
        failure = Failure(reason or OSError(errno.ENOTCONN, "channel closed"))
        for _, d in queue:
            d.errback(failure)
