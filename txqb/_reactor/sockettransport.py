"""
The ``QB_IPC_SOCKET`` transport, both ends.

Requests and responses share one connected datagram pair, events use a
second pair, and a 24-byte control file carries the flow-control word and
queue-length hints.  The server binds ``B-request`` and ``B-event-tx``
before answering the handshake and connects to the client's ``B-response``
and ``B-event`` lazily, at its first send; the client binds both of its
names and connects at once.
"""

from __future__ import annotations

import mmap
import os
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet

from txqb._posix.files import PrivateDirectory, mapFile
from txqb._posix.shmring import removeControlFile as _removeControlFile
from txqb._posix.sockets import (
    CONTROL_EVENT_SENT,
    CONTROL_FILE_SIZE,
    CONTROL_REQUEST_FLOW_CONTROL,
    CONTROL_REQUEST_SENT,
    datagramSocket,
    openClientSocketFiles,
)
from txqb._reactor.datagram import DatagramChannel
from txqb._reactor.hub import readerHubFor
from txqb._wire.handshake import TRANSPORT_SOCKET
from txqb._wire.headers import Buffer, Payload
from txqb._wire.naming import socketNames
from txqb._wire.ring import loadInt, storeWord

__all__ = ["ServerSocketChannels", "ClientSocketChannels", "CONTROL_FILE_SIZE"]



def _ignore(_: Buffer) -> None:
    pass


def _add(control: mmap.mmap, offset: int, delta: int) -> None:
    # libqb updates these counters atomically; Python cannot.  They are
    # queue-length hints read only for statistics, so a rare lost update
    # is tolerable, while the flow-control word (a plain store) is exact.
    storeWord(control, offset, loadInt(control, offset) + delta)


class ServerSocketChannels:
    """
    A server's end of one socket-transport connection.

    Created during the handshake, after the accept policy has run and
    before the connection response is sent, so that every name the
    response announces already exists.
    """

    transportType = TRANSPORT_SOCKET

    def __init__(
        self,
        reactor: IReactorFDSet,
        setup: object,
        directory: PrivateDirectory,
        service: str,
        maxMessageSize: int,
        uid: int,
        gid: int,
        mode: int,
        onRequest: Callable[[Buffer], None],
        onError: Callable[[BaseException], None],
    ) -> None:
        names = socketNames(directory.path, service)
        fd = directory.createFile(
            os.path.basename(names.control), CONTROL_FILE_SIZE, uid, gid, mode
        )
        try:
            self._control: Optional[mmap.mmap] = mapFile(fd, CONTROL_FILE_SIZE)
        finally:
            os.close(fd)
        self._control.write(bytes(CONTROL_FILE_SIZE))
        requestSocket = eventSocket = None
        try:
            requestSocket = datagramSocket(names.request, maxMessageSize)
            eventSocket = datagramSocket(names.eventTx, maxMessageSize)
        except BaseException:
            for sock in (requestSocket, eventSocket):
                if sock is not None:
                    sock.close()
            self._control.close()
            raise
        self.requests = DatagramChannel(
            reactor,
            requestSocket,
            maxMessageSize,
            onRequest,
            onError,
            peer=names.response,
            name="qb-request",
            readers=readerHubFor(reactor),
        )
        self.events = DatagramChannel(
            reactor,
            eventSocket,
            0,
            _ignore,
            onError,
            peer=names.event,
            name="qb-event-tx",
        )
        self.strings = (names.control, names.base, "")

    @property
    def batch(self) -> int:
        """Requests read per wake-up at most."""
        return self.requests.batch

    @batch.setter
    def batch(self, value: int) -> None:
        self.requests.batch = value

    @property
    def emptyReads(self) -> int:
        """Wake-ups that found no request (libqb's ``recv_retries``)."""
        return self.requests.emptyReads

    def startReading(self) -> None:
        """Begin (or resume) reading requests."""
        self.requests.startReading()

    def stopReading(self) -> None:
        """Leave requests queued in the socket: flow control is on."""
        self.requests.stopReading()

    def setupBytesReceived(self, data: bytes) -> None:
        """Bytes on the setup socket mean nothing in this transport."""

    def sendResponse(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Send one response datagram (queued while the socket is full)."""
        return self.requests.send(header, payload)

    def sendEvent(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Send one event datagram and count it for queue-length stats."""
        result = self.events.send(header, payload)
        if self._control is not None:
            _add(self._control, CONTROL_EVENT_SENT, 1)
        return result

    def eventQueueLength(self) -> int:
        """Events sent and not yet read by the client, as libqb counts."""
        if self._control is None:
            return 0
        return max(0, loadInt(self._control, CONTROL_EVENT_SENT))

    def setFlowControl(self, value: int) -> None:
        """Write the flow-control word every libqb client checks."""
        if self._control is not None:
            storeWord(self._control, CONTROL_REQUEST_FLOW_CONTROL, value)

    def close(self, reason: Optional[BaseException] = None) -> None:
        """Close both sockets and unmap the control file."""
        self.requests.close(reason)
        self.events.close(reason)
        if self._control is not None:
            self._control.close()
            self._control = None


class ClientSocketChannels:
    """A client's end of one socket-transport connection."""

    transportType = TRANSPORT_SOCKET

    def __init__(
        self,
        reactor: IReactorFDSet,
        controlPath: str,
        base: str,
        maxMessageSize: int,
        receiveSize: int,
        onResponse: Callable[[Buffer], None],
        onEvent: Callable[[Buffer], None],
        onError: Callable[[BaseException], None],
    ) -> None:
        self._controlPath = controlPath
        files = openClientSocketFiles(controlPath, base, maxMessageSize)
        self._control: Optional[mmap.mmap] = files.control
        requestSocket, eventSocket = files.requests, files.events
        self.requests = DatagramChannel(
            reactor, requestSocket, receiveSize, onResponse, onError, name="qb-response"
        )
        self.events = DatagramChannel(
            reactor, eventSocket, receiveSize, self._eventReceived, onError, name="qb-event"
        )
        self._onEvent = onEvent
        self.requests.startReading()
        self.events.startReading()

    def drainEvents(self) -> None:
        """
        Read the events already queued, so that events the server sent
        before a response are delivered before it (a unix datagram is in
        the receiver's queue as soon as it is sent).

        The control file's event count cannot say whether any are queued:
        this client's decrements are not atomic and may lose the server's
        increments, so it may read low.  One non-blocking read costs less
        than a wrong answer.
        """
        if self.events.reading:
            self.events.drain()

    def consumed(self) -> None:
        """
        A receiver has copied its datagram.  Nothing to give back: each
        datagram was read into the channel's own buffer.
        """

    def _eventReceived(self, data: Buffer) -> None:
        if self._control is not None:
            _add(self._control, CONTROL_EVENT_SENT, -1)
        self._onEvent(data)

    def flowControl(self) -> int:
        """The server's flow-control word, read before every send."""
        if self._control is None:
            return 0
        return loadInt(self._control, CONTROL_REQUEST_FLOW_CONTROL)

    def sendRequest(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Send one request datagram, counting it as libqb's client does."""
        result = self.requests.send(header, payload)
        if self._control is not None:
            _add(self._control, CONTROL_REQUEST_SENT, 1)
        return result

    def drain(self) -> None:
        """Deliver every response and event already queued."""
        for channel in (self.events, self.requests):
            if not channel.closed:
                channel.drain()

    def awaiting(self, outstanding: bool) -> None:
        """Responses arrive on a socket the reactor watches: nothing to do."""

    def pauseEvents(self) -> None:
        """Stop reading events; the server's sends back up and wait."""
        self.events.stopReading()

    def resumeEvents(self) -> None:
        """Read events again."""
        self.events.startReading()

    def setupBytesReceived(self, data: bytes) -> None:
        """Bytes on the setup socket mean nothing in this transport."""

    def close(self, reason: Optional[BaseException] = None) -> None:
        """
        Close the sockets, unmap and remove the control file and its
        directory, as libqb's ``qb_ipcc_disconnect`` does.
        """
        self.requests.close(reason)
        self.events.close(reason)
        if self._control is not None:
            self._control.close()
            self._control = None
            _removeControlFile(self._controlPath)
