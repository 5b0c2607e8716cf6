"""
A blocking libqb client, without Twisted.

For scripts, command-line tools and tests that want one answer now rather
than an event loop: L{connect} returns a L{BlockingClient} whose
L{request<BlockingClient.request>} waits for its response, like libqb's
``qb_ipcc_sendv_recv``.  It speaks to C libqb servers and txqb servers
alike, over whichever transport the server chooses (``QB_IPC_SOCKET`` or
``QB_IPC_SHM``), and imports nothing from Twisted, so a short-lived
program starts quickly::

    from txqb.blocking import connect

    with connect("echo") as client:
        print(client.request(0, b"hello").payload)

Every wait takes a timeout in seconds (L{None}: wait for ever) and raises
L{QBTimeoutError} when it runs out.  One client serves one thread at a
time.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import time
from typing import Callable, List, Optional, Tuple, TypeVar, Union

from txqb._posix.shmring import SharedRing, removeControlFile, removeIfOrphaned
from txqb._posix.sockets import (
    CONTROL_EVENT_SENT,
    CONTROL_REQUEST_FLOW_CONTROL,
    CONTROL_REQUEST_SENT,
    CREDENTIALS_CMSG_SPACE,
    Credentials,
    openClientSocketFiles,
    parseCredentials,
    peerCredentials,
    streamClient,
)
from txqb._wire.handshake import (
    CONNECTION_RESPONSE_SIZE,
    MIN_CLIENT_MAX_MSG_SIZE,
    TRANSPORT_SHM,
    TRANSPORT_SOCKET,
    ConnectionRequest,
    ConnectionResponse,
)
from txqb._wire.headers import Gather, MalformedMessage, Message, decodeResponse, encodeRequest
from txqb._wire.naming import (
    DEFAULT_SOCKET_DIR,
    FORCE_FILESYSTEM_FLAG,
    serviceAddress,
)
from txqb._wire.ring import USER_DATA, RingError, loadInt, storeWord
from txqb.errors import (
    ConnectionLostError,
    MessageTooLargeError,
    ProtocolError,
    QBError,
    QBTimeoutError,
    RefusedError,
    ServiceNotFoundError,
)

__all__ = ["connect", "BlockingClient", "DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_TIMEOUT"]

DEFAULT_MAX_MESSAGE_SIZE = 65536
"""The message size a client asks for unless told otherwise (as L{txqb.client})."""

DEFAULT_TIMEOUT = 30.0
"""Seconds L{connect} waits for the server's handshake by default."""

_RESPONSE_SLACK = 4096  # C servers may answer a little beyond the negotiated size
_POLL_FIRST = 0.001
_POLL_MAX = 0.02
_SEM_SLICE = 0.1
_PEER_GONE = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + max(timeout, 0.0)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left (never negative), or None for no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _pollMs(seconds: Optional[float]) -> Optional[int]:
    return None if seconds is None else int(seconds * 1000 + 0.999)


def _readable(fds: List[int], seconds: Optional[float]) -> List[int]:
    """The fds of C{fds} readable (or hung up) within C{seconds}."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(_pollMs(seconds))]


class _Setup:
    """The setup socket after the handshake: doorbells out, EOF in."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.doorbells = 0

    def lost(self) -> ConnectionLostError:
        return ConnectionLostError(f"service {self.name!r} closed the connection")

    def consume(self) -> None:
        """Read what is there (event doorbells); raise once the server is gone."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise self.lost() from e
        if not data:
            raise self.lost()
        self.doorbells += len(data)

    def ring(self, byte: bytes, deadline: Optional[float]) -> None:
        """Send one doorbell byte, waiting for room in the socket."""
        while True:
            try:
                self.sock.send(byte, socket.MSG_NOSIGNAL)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise self.lost() from e
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLOUT)
            if not poller.poll(_pollMs(_remaining(deadline))):
                raise QBTimeoutError("the server's setup socket stayed full")


class _SocketChannels:
    """A client's end of a ``QB_IPC_SOCKET`` connection, blocking."""

    def __init__(self, setup: _Setup, response: ConnectionResponse, receiveSize: int) -> None:
        controlPath = response.request
        self._setup = setup
        self._receiveSize = receiveSize
        self._controlPath = controlPath
        files = openClientSocketFiles(controlPath, response.response, response.maxMessageSize)
        self._control: Optional[mmap.mmap] = files.control
        self._requests, self._events = files.requests, files.events
        self._sockets: List[socket.socket] = [self._requests, self._events]

    def _add(self, offset: int, delta: int) -> None:
        # Queue-length hints, as txqb's Twisted client keeps them.
        if self._control is not None:
            storeWord(self._control, offset, loadInt(self._control, offset) + delta)

    def flowControl(self) -> int:
        return loadInt(self._control, CONTROL_REQUEST_FLOW_CONTROL) if self._control else 0

    def sendRequest(self, data: bytes, deadline: Optional[float]) -> None:
        while True:
            try:
                self._requests.send(data)
                break
            except (BlockingIOError, InterruptedError):
                poller = select.poll()
                poller.register(self._requests.fileno(), select.POLLOUT)
                if not poller.poll(_pollMs(_remaining(deadline))):
                    raise QBTimeoutError("the server's request queue stayed full") from None
            except OSError as e:
                if e.errno in _PEER_GONE:
                    raise self._setup.lost() from e
                if e.errno == errno.EMSGSIZE:
                    raise MessageTooLargeError(
                        f"request of {len(data)} bytes does not fit the socket", e.errno
                    ) from e
                raise QBError(f"send failed: {e.strerror}", e.errno) from e
        self._add(CONTROL_REQUEST_SENT, 1)

    def _receive(self, sock: socket.socket, deadline: Optional[float]) -> Optional[bytes]:
        setup = self._setup.sock.fileno()
        while True:
            try:
                return sock.recv(self._receiveSize)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise self._setup.lost() from e
            ready = _readable([sock.fileno(), setup], _remaining(deadline))
            if not ready:
                return None
            if setup in ready and sock.fileno() not in ready:
                self._setup.consume()

    def receiveResponse(self, deadline: Optional[float]) -> Optional[bytes]:
        return self._receive(self._requests, deadline)

    def receiveEvent(self, deadline: Optional[float]) -> Optional[bytes]:
        data = self._receive(self._events, deadline)
        if data is not None:
            self._add(CONTROL_EVENT_SENT, -1)
        return data

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._control is not None:
            self._control.close()
            self._control = None
            removeControlFile(self._controlPath)


class _ShmChannels:
    """
    A client's end of a ``QB_IPC_SHM`` connection, blocking: requests are
    committed to the request ring with a doorbell byte; responses are
    awaited on the response ring's semaphore; events are announced by
    doorbell bytes on the setup socket.
    """

    def __init__(self, setup: _Setup, response: ConnectionResponse) -> None:
        self._setup = setup
        self._names = (response.request, response.response, response.event)
        self._rings: List[SharedRing] = []
        try:
            for base in self._names:
                self._rings.append(SharedRing.attach(base))
        except BaseException:
            self.close()
            raise
        self._request, self._response, self._event = self._rings

    def flowControl(self) -> int:
        return loadInt(self._request.header, USER_DATA) if self._rings else 0

    def sendRequest(self, data: bytes, deadline: Optional[float]) -> None:
        delay = _POLL_FIRST
        while True:
            try:
                self._request.ring.write(data)
                break
            except RingError as e:
                if e.errno != errno.EAGAIN:
                    raise MessageTooLargeError(str(e), e.errno) from None
            left = _remaining(deadline)
            if left == 0:
                raise QBTimeoutError("the server's request ring stayed full")
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        # One byte per request, after the post: a C server reads as many
        # bytes as it processed chunks.
        self._setup.ring(b"\x18", deadline)

    def receiveResponse(self, deadline: Optional[float]) -> Optional[bytes]:
        semaphore = self._response.semaphore
        while True:
            left = _remaining(deadline)
            if semaphore.timedWait(_SEM_SLICE if left is None else min(_SEM_SLICE, left)):
                return self._response.ring.read(counted=True)
            if left is not None and left <= _SEM_SLICE:
                return None
            # A server that died posts nothing: notice its end on the way.
            if _readable([self._setup.sock.fileno()], 0):
                try:
                    self._setup.consume()
                except ConnectionLostError:
                    if self._response.ring.committedAhead():
                        return self._response.ring.read()
                    raise

    def receiveEvent(self, deadline: Optional[float]) -> Optional[bytes]:
        ring = self._event.ring
        while True:
            try:
                return ring.read()
            except RingError as e:
                if e.errno != errno.EAGAIN:
                    raise ProtocolError(f"event ring: {e}", e.errno) from None
            if not _readable([self._setup.sock.fileno()], _remaining(deadline)):
                return None
            self._setup.consume()

    def close(self) -> None:
        rings, self._rings = self._rings, []
        for ring in rings:
            ring.detach()
        if rings:
            removeIfOrphaned(self._names)


_Channels = Union[_SocketChannels, _ShmChannels]
T = TypeVar("T")


class BlockingClient:
    """
    A connection to a libqb service, used by blocking calls; made by
    L{connect}.  Use it as a context manager, or call L{close}.

    @ivar name: the service name.
    @ivar serverCredentials: the server's pid, uid and gid, from the kernel.
    @ivar maxMessageSize: the negotiated message size.
    @ivar transportType: the transport the server chose (0 socket, 1 shm).
    """

    def __init__(
        self,
        name: str,
        setup: socket.socket,
        response: ConnectionResponse,
        credentials: Credentials,
        fcEnableMax: int = 1,
    ) -> None:
        self.name = name
        self.serverCredentials = credentials
        self.maxMessageSize = response.maxMessageSize
        self.transportType = response.transport
        self.fcEnableMax = fcEnableMax
        self._setup = _Setup(setup, name)
        self._late = 0
        self._channels: Optional[_Channels]
        if response.transport == TRANSPORT_SOCKET:
            self._channels = _SocketChannels(
                self._setup, response, self.maxMessageSize + _RESPONSE_SLACK
            )
        elif response.transport == TRANSPORT_SHM:
            self._channels = _ShmChannels(self._setup, response)
        else:
            raise QBError(
                f"server chose transport {response.transport}, which libqb 2.x does not define",
                errno.ENOTSUP if response.transport in (2, 3) else errno.EINVAL,
            )

    def __repr__(self) -> str:
        return f"<txqb blocking client {self.name!r} {'connected' if self.connected else 'closed'}>"

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True until L{close} or until the server is found gone."""
        return self._channels is not None

    def _open(self) -> _Channels:
        if self._channels is None:
            raise ConnectionLostError(f"{self!r} is not connected")
        return self._channels

    def _checked(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except ConnectionLostError:
            self.close()
            raise

    def send(self, msgId: int, payload: Gather = b"", timeout: Optional[float] = None) -> None:
        """
        Send a request that expects no response (``qb_ipcc_send``),
        waiting while the server has flow control on or its queue is full.
        C{payload} may be a tuple or list of buffers (``qb_ipcc_sendv``),
        joined into one message.

        @raise MessageTooLargeError: larger than the negotiated size;
            nothing was sent.
        @raise QBTimeoutError: still held back after C{timeout} seconds.
        """
        channels = self._open()
        data = encodeRequest(msgId, payload)
        if len(data) > self.maxMessageSize:
            raise MessageTooLargeError(
                f"request of {len(data)} bytes exceeds the connection's"
                f" {self.maxMessageSize}-byte limit"
            )
        deadline = _deadline(timeout)
        delay = _POLL_FIRST
        while 0 < channels.flowControl() <= self.fcEnableMax:
            left = _remaining(deadline)
            if left == 0:
                raise QBTimeoutError(f"service {self.name!r} kept flow control on")
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        self._checked(lambda: channels.sendRequest(data, deadline))

    def request(self, msgId: int, payload: Gather = b"", timeout: Optional[float] = None) -> Message:
        """
        Send a request and wait for its response (``qb_ipcc_sendv_recv``).

        A request that timed out keeps its place: its late response is
        read and dropped, so the next request still gets its own.

        @raise MessageTooLargeError: nothing was sent.
        @raise QBTimeoutError: no response within C{timeout} seconds.
        @raise ConnectionLostError: the server went away.
        @raise ProtocolError: the response is not libqb's framing.
        """
        deadline = _deadline(timeout)
        self.send(msgId, payload, timeout)
        channels = self._open()
        while True:
            data = self._checked(lambda: channels.receiveResponse(deadline))
            if data is None:
                self._late += 1
                raise QBTimeoutError(f"no response from {self.name!r} within {timeout} s")
            if self._late:
                self._late -= 1
                continue
            return self._decode(data, "response")

    def receiveEvent(self, timeout: Optional[float] = None) -> Message:
        """
        Wait for the next event the server sends (``qb_ipcc_event_recv``).

        @raise QBTimeoutError: none within C{timeout} seconds.
        @raise ConnectionLostError: the server went away.
        """
        channels = self._open()
        data = self._checked(lambda: channels.receiveEvent(_deadline(timeout)))
        if data is None:
            raise QBTimeoutError(f"no event from {self.name!r} within {timeout} s")
        return self._decode(data, "event")

    def _decode(self, data: bytes, what: str) -> Message:
        try:
            return decodeResponse(data, self.maxMessageSize + _RESPONSE_SLACK)
        except MalformedMessage as e:
            raise ProtocolError(f"malformed {what}: {e.reason}", e.errno) from None

    def close(self) -> None:
        """Disconnect (``qb_ipcc_disconnect``) and remove what the client should."""
        channels, self._channels = self._channels, None
        if channels is None:
            return
        self._setup.sock.close()
        channels.close()


def _handshake(
    sock: socket.socket, name: str, maxMessageSize: int, deadline: Optional[float]
) -> Tuple[ConnectionResponse, Credentials]:
    request = ConnectionRequest(maxMessageSize).encode()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(_pollMs(_remaining(deadline))):
        raise QBTimeoutError(f"service {name!r} did not answer within the timeout")
    try:
        sock.send(request, socket.MSG_NOSIGNAL)
    except OSError as e:
        raise ConnectionLostError(
            f"service {name!r} closed the connection during the handshake"
        ) from e
    buffer = b""
    credentials: Optional[Credentials] = None
    while len(buffer) < CONNECTION_RESPONSE_SIZE:
        if not _readable([sock.fileno()], _remaining(deadline)):
            raise QBTimeoutError(f"service {name!r} did not answer within the timeout")
        try:
            data, ancillary, _, _ = sock.recvmsg(
                CONNECTION_RESPONSE_SIZE - len(buffer), CREDENTIALS_CMSG_SPACE
            )
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as e:
            data, ancillary = b"", []
            if e.errno not in _PEER_GONE:
                raise QBError(f"handshake with {name!r} failed: {e.strerror}", e.errno) from e
        if not data:
            raise ConnectionLostError(
                f"service {name!r} closed the connection during the handshake"
            )
        credentials = credentials or parseCredentials(ancillary)
        buffer += data
    try:
        response = ConnectionResponse.decode(buffer)
    except MalformedMessage as e:
        raise ProtocolError(f"bad connection response: {e.reason}", e.errno) from None
    if response.error != 0:
        raise RefusedError.fromResponse(name, response.error)
    return response, credentials or peerCredentials(sock)


def connect(
    name: str,
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    fcEnableMax: int = 1,
    filesystemSockets: Optional[bool] = None,
    socketDirectory: str = DEFAULT_SOCKET_DIR,
) -> BlockingClient:
    """
    Connect to the libqb service C{name} (``qb_ipcc_connect``), blocking.

    @param maxMessageSize: the size to ask for, raised to libqb's client
        minimum of 12328; the server may grant more.
    @param timeout: seconds to wait for the server's handshake.
    @param fcEnableMax: the highest flow-control value that holds sends
        back, as in L{txqb.client.connect}.
    @param filesystemSockets: use a filesystem setup socket in
        C{socketDirectory}; by default, when libqb's flag file
        C{/etc/libqb/force-filesystem-sockets} exists.
    @raise ServiceNotFoundError: nothing listens under C{name}.
    @raise RefusedError: the server refused (its errno, e.g. ``EACCES``).
    @raise QBTimeoutError: no handshake within C{timeout}.
    @raise ValueError: C{name} cannot be a libqb service name.
    """
    if fcEnableMax not in (0, 1, 2):
        raise ValueError("fcEnableMax must be 0, 1 or 2, as in libqb")
    if filesystemSockets is None:
        filesystemSockets = os.path.exists(FORCE_FILESYSTEM_FLAG)
    address = serviceAddress(name, filesystemSockets, socketDirectory)
    deadline = _deadline(timeout)
    delay = _POLL_FIRST
    while True:
        try:
            sock = streamClient(address)
            break
        except (BlockingIOError, InterruptedError):
            # The server's backlog is full: try again shortly.
            left = _remaining(deadline)
            if left == 0:
                raise QBTimeoutError(f"service {name!r} did not accept within {timeout} s") from None
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ServiceNotFoundError(
                    f"no libqb service {name!r} is listening", e.errno
                ) from None
            raise QBError(f"cannot connect to {name!r}: {e.strerror}", e.errno) from None
    try:
        response, credentials = _handshake(
            sock, name, max(maxMessageSize, MIN_CLIENT_MAX_MSG_SIZE), deadline
        )
        return BlockingClient(name, sock, response, credentials, fcEnableMax)
    except QBError:
        sock.close()
        raise
    except (OSError, ValueError) as e:
        sock.close()
        code = getattr(e, "errno", None) or errno.EBADMSG
        raise QBError(f"cannot open the server's transport: {e}", code) from None
    except BaseException:
        sock.close()
        raise
