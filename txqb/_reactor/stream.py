"""
The setup socket as a Twisted transport.

libqb's setup channel is a ``SOCK_STREAM`` unix socket that txqb creates
itself (libqb's padded abstract addresses, ``SO_PASSCRED``) and then hands
to a L{Protocol} through this transport.  Being a
L{twisted.internet.abstract.FileDescriptor}, it needs nothing from the
reactor but L{IReactorFDSet}.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from typing import Optional, Protocol as TypingProtocol

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from txqb._posix.libc import libcKeepingGil as _libcKeepingGil
from txqb._posix.sockets import CREDENTIALS_CMSG_SPACE, Credentials, parseCredentials
from txqb._reactor.hub import Readers

__all__ = ["UnixStreamTransport", "UnixSetupAddress", "SetupOwner", "SetupProtocol"]

_READ_SIZE = 65536
_NOW_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
_libcKeepingGil.send.restype = ctypes.c_ssize_t
_libcKeepingGil.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
# A send that never blocks, without releasing the GIL: Python's own
# socket.send releases it, and a thread waiting for it (a response
# watcher) takes it then, so the reactor thread waits to get it back.
_sendKeepingGil = _libcKeepingGil.send


class SetupOwner(TypingProtocol):
    """Whoever drives a connection's setup socket at the moment."""

    def _setupData(self, data: bytes) -> None:
        """Bytes arrived on the setup socket."""

    def _setupLost(self, reason: Failure) -> None:
        """The setup socket is closed: the connection is over."""


class SetupProtocol(Protocol):
    """
    Hands the setup socket's bytes and its loss to its owner; the owner can
    change (a client's handshake hands over to the connected client).
    """

    def __init__(self, owner: SetupOwner) -> None:
        self.owner = owner

    def dataReceived(self, data: bytes) -> None:
        self.owner._setupData(data)

    def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self.owner._setupLost(reason)


class UnixSetupAddress:
    """The address of a setup socket, printable for logs."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        if self.raw[:1] == b"\0":
            return "@" + self.raw[1:].rstrip(b"\0").decode("utf-8", "replace")
        return self.raw.decode("utf-8", "replace")


class UnixStreamTransport(FileDescriptor):
    """
    A connected ``SOCK_STREAM`` unix socket driving a protocol.

    @ivar credentials: the peer's credentials from the first
        ``SCM_CREDENTIALS`` message received while C{wantCredentials} was
        on (a libqb client reads the server's credentials this way).
    @ivar readers: what drives the reads: the reactor, or a
        L{txqb._reactor.hub.ReaderHub} (a server's many connections).
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol: Protocol,
        reactor: IReactorFDSet,
        address: bytes,
        wantCredentials: bool = False,
        readers: Optional[Readers] = None,
    ) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self.readers: Readers = reactor if readers is None else readers
        self.socket = sock
        self._fd = sock.fileno()
        self.protocol = protocol
        self.address = UnixSetupAddress(address)
        # Asked for by the reactor around every read: made once.
        self._logPrefix = f"qb-setup {self.address!r}"
        self.wantCredentials = wantCredentials
        self.credentials: Optional[Credentials] = None
        self.connected = 1
        protocol.makeConnection(self)

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once closed."""
        return self._fd

    def startReading(self) -> None:
        """Have L{readers} call L{doRead} when there is something to read."""
        self.readers.addReader(self)

    def stopReading(self) -> None:
        """Leave what arrives in the socket (L{readers} stops calling)."""
        self.readers.removeReader(self)

    def logPrefix(self) -> str:
        """Name the service in log lines."""
        return self._logPrefix

    def getHost(self) -> UnixSetupAddress:  # type: ignore[override]
        """The service's address (both ends name the service)."""
        return self.address

    def getPeer(self) -> UnixSetupAddress:  # type: ignore[override]
        """The service's address; unix client sockets are unnamed."""
        return self.address

    def doRead(self) -> Optional[Failure]:
        """Read what is there and hand it to the protocol."""
        try:
            if self.wantCredentials:
                data, ancillary, _, _ = self.socket.recvmsg(
                    _READ_SIZE, CREDENTIALS_CMSG_SPACE
                )
                found = parseCredentials(ancillary)
                if found is not None and self.credentials is None:
                    self.credentials = found
            else:
                data = self.socket.recv(_READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EINTR:
                return None
            return Failure(main.CONNECTION_LOST)
        if not data:
            return Failure(main.CONNECTION_DONE)
        self.protocol.dataReceived(data)
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:  # type: ignore[override]
        """
        Send as much as the socket takes; never raise ``SIGPIPE``.  A dead
        peer is reported as FileDescriptor expects: an exception instance
        (not a Failure), which ends the connection.
        """
        try:
            return self.socket.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.EINTR:
                return 0
            return main.CONNECTION_LOST

    def writeNow(self, data: bytes) -> None:
        """
        Send at once when nothing is queued (one ``send``, no reactor turn),
        else queue behind what is: a doorbell must not wait for the next
        reactor iteration and two ``epoll_ctl`` calls.
        """
        if self.dataBuffer or self._tempDataBuffer or self.disconnecting or self._fd < 0:
            self.write(data)
            return
        sent = _sendKeepingGil(self._fd, data, len(data), _NOW_FLAGS)
        if sent < 0:
            # Full, interrupted or broken: the ordinary write path waits
            # or finds the error and closes.
            sent = 0
        if sent < len(data):
            self.write(data[sent:])

    def abortConnection(self) -> None:
        """Close at once, dropping anything not yet written."""
        if self.disconnected:
            return
        self.stopReading()  # type: ignore[no-untyped-call]
        self.stopWriting()  # type: ignore[no-untyped-call]
        self.connectionLost(Failure(main.CONNECTION_DONE))

    def connectionLost(self, reason: Failure) -> None:
        """Close the socket and tell the protocol, exactly once."""
        if self._fd < 0:
            return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self._fd = -1
        self.socket.close()
        protocol, self.protocol = self.protocol, Protocol()
        protocol.connectionLost(reason)
