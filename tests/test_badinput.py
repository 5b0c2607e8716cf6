"""
Hostile and broken peers.

Each bad input gets a clear error (logged by the server, raised into the
client's Deferred); only the offending connection is dropped; other
clients keep being served; the autouse fixture in conftest.py checks that
no fd, ``/dev/shm`` entry or reactor state is left behind.

The raw peers here speak the protocol by hand with blocking sockets in a
thread, so that the reactor keeps serving while they misbehave.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any, Iterator, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import provider

import txqb
from handlers import PeerHandlers
from txqb._wire.handshake import CONNECTION_RESPONSE_SIZE, ConnectionRequest, ConnectionResponse
from txqb._wire.naming import abstractAddress, clientSocketNames

_HDR = struct.Struct("<i4xi4x")


def _recvExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class RawClient:
    """A libqb client written by hand, blocking, for use in a thread."""

    def __init__(self, name: str, maxSize: int = 12328) -> None:
        self.name = name
        self.maxSize = maxSize
        self.setup = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.setup.settimeout(10)
        self.sockets: List[socket.socket] = [self.setup]

    def connect(self) -> ConnectionResponse:
        self.setup.connect(abstractAddress(self.name.encode()))
        self.setup.sendall(ConnectionRequest(self.maxSize).encode())
        response = ConnectionResponse.decode(_recvExactly(self.setup, CONNECTION_RESPONSE_SIZE))
        names = clientSocketNames(response.request, response.response)
        self.request = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sockets.append(self.request)
        self.request.bind(names.response)
        self.request.connect(names.request)
        self.request.settimeout(10)
        event = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sockets.append(event)
        event.bind(names.event)
        event.connect(names.eventTx)
        return response

    def closedByPeer(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the setup socket within C{timeout}."""
        self.setup.settimeout(timeout)
        try:
            return self.setup.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def logged() -> Iterator[List[dict[str, Any]]]:
    """Log events emitted while the test runs."""
    events: List[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def _errors(events: List[dict[str, Any]]) -> List[str]:
    from twisted.logger import formatEvent

    return [
        formatEvent(e)
        for e in events
        if e.get("log_level") in (LogLevel.error, LogLevel.warn)
        and e.get("log_namespace") == "txqb.server"
    ]


async def _stillServing(reactor: Any, name: str) -> None:
    client = await txqb.connect(reactor, name)
    try:
        assert (await client.request(0, b"alive")).payload == b"alive"
    finally:
        await client.disconnect()


def _req(msgId: int, declared: int, length: int) -> bytes:
    return _HDR.pack(msgId, declared) + bytes(length - 16)


MAX = 12328

CASES = {
    "shorter than a header": b"\x00" * 8,
    "size 0": _req(0, 0, 16),
    "size -1": _req(0, -1, 24),
    "size above the maximum": _req(0, MAX + 1, 24),
    "size below the length": _req(0, 20, 24),
    "size above the length": _req(0, 64, 24),
    "datagram above the maximum": _req(0, MAX + 100, MAX + 100),
    "reserved id -1": _req(-1, 16, 16),
    "reserved id -2": _req(-2, 16, 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest_twisted.ensureDeferred
async def test_malformedRequest(
    reactor: Any, serviceName: str, case: str, logged: List[dict[str, Any]]
) -> None:
    """Only the offender is dropped, with a logged reason; others go on."""
    service = txqb.listen(reactor, serviceName, PeerHandlers())
    bystander = await txqb.connect(reactor, serviceName)
    raw = RawClient(serviceName)
    try:

        def misbehave() -> bool:
            raw.connect()
            raw.request.send(CASES[case])
            return raw.closedByPeer()

        assert await deferToThread(misbehave)
        assert (await bystander.request(0, b"still here")).payload == b"still here"
        assert len(service.connections) == 1
        assert any("dropping the connection" in line for line in _errors(logged)), _errors(logged)
    finally:
        raw.close()
        await bystander.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_disconnectRequest(reactor: Any, serviceName: str) -> None:
    """QB_IPC_MSG_DISCONNECT (-3) is an orderly goodbye, not an error."""
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers)
    raw = RawClient(serviceName)
    try:

        def goodbye() -> bool:
            raw.connect()
            raw.request.send(_req(-3, 16, 16))
            return raw.closedByPeer()

        assert await deferToThread(goodbye)
        await handlers.allClosed()
        assert handlers.names() == ["accept", "created", "closed", "destroyed"]
    finally:
        raw.close()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_silentClient(reactor: Any, serviceName: str, logged: List[dict[str, Any]]) -> None:
    """A peer that connects and never authenticates stalls nobody."""
    service = txqb.listen(reactor, serviceName, PeerHandlers(), handshakeTimeout=0.5)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(abstractAddress(serviceName.encode()))
        started = time.monotonic()
        await _stillServing(reactor, serviceName)
        assert time.monotonic() - started < 0.5  # served while the silent one waits
        silent.settimeout(10)
        assert await deferToThread(silent.recv, 1) == b""
        assert any("no connection request" in line for line in _errors(logged))
    finally:
        silent.close()
        await service.stopListening()


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest_twisted.ensureDeferred
async def test_diesMidHandshake(reactor: Any, serviceName: str, how: str) -> None:
    """A client gone after part of its connection request leaves nothing."""
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(abstractAddress(serviceName.encode()))
    half.send(ConnectionRequest(MAX).encode()[:10])
    await task.deferLater(reactor, 0.05, lambda: None)
    if how == "reset":
        half.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    half.close()
    try:
        while service._pending:
            await task.deferLater(reactor, 0.01, lambda: None)
        assert handlers.calls == []
        await _stillServing(reactor, serviceName)
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_splitHandshake(reactor: Any, serviceName: str) -> None:
    """16 bytes, a pause, 8 bytes: accepted, as libqb accepts it."""
    service = txqb.listen(reactor, serviceName, PeerHandlers())
    raw = RawClient(serviceName)

    def split() -> ConnectionResponse:
        raw.setup.connect(abstractAddress(serviceName.encode()))
        request = ConnectionRequest(MAX).encode()
        raw.setup.sendall(request[:16])
        time.sleep(0.1)
        raw.setup.sendall(request[16:])
        return ConnectionResponse.decode(_recvExactly(raw.setup, CONNECTION_RESPONSE_SIZE))

    try:
        response = await deferToThread(split)
        assert response.error == 0 and response.maxMessageSize == MAX
    finally:
        raw.close()
        while service.connections:
            await task.deferLater(reactor, 0.01, lambda: None)
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_badConnectionRequestId(reactor: Any, serviceName: str) -> None:
    """id -2 (the long-dead NEW_EVENT_SOCK) is closed without an answer."""
    service = txqb.listen(reactor, serviceName, PeerHandlers())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(abstractAddress(serviceName.encode()))
        sock.send(struct.pack("<i4xi4xI4x", -2, 24, MAX))
        sock.settimeout(10)
        assert await deferToThread(sock.recv, 1) == b""
    finally:
        sock.close()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_hugeWishRefused(reactor: Any, serviceName: str) -> None:
    """A 4 GiB wish is refused with EMSGSIZE, not granted (libqb grants it)."""
    service = txqb.listen(reactor, serviceName, PeerHandlers())
    try:
        with pytest.raises(txqb.RefusedError) as e:
            await txqb.connect(reactor, serviceName, maxMessageSize=0xFFFFFFFF)
        assert e.value.errno == errno.EMSGSIZE
        await _stillServing(reactor, serviceName)
    finally:
        await service.stopListening()


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_churn(reactor: Any, serviceName: str, transport: str) -> None:
    """1000 connect/disconnect cycles and 300 refusals: nothing accumulates."""
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        for _ in range(1000):
            client = await txqb.connect(reactor, serviceName)
            await client.disconnect()
        handlers.refuse = errno.EACCES
        for _ in range(300):
            with pytest.raises(txqb.RefusedError):
                await txqb.connect(reactor, serviceName)
        while service.connections or service._pending:
            await task.deferLater(reactor, 0.01, lambda: None)
        assert handlers.names().count("destroyed") == 1300
    finally:
        await service.stopListening()


# Broken servers, seen from a txqb client


class RawServer:
    """A setup-socket listener that answers the handshake as told."""

    def __init__(self, name: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(abstractAddress(name.encode()))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.conn: Optional[socket.socket] = None

    def answer(self, data: bytes, close: bool) -> None:
        self.conn, _ = self.listener.accept()
        _recvExactly(self.conn, 24)
        if data:
            self.conn.sendall(data)
        if close:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize(
    "data, close, error",
    [
        (b"\xff" * 100, True, txqb.ConnectionLostError),
        (ConnectionResponse(0, 0, MAX, "", "", "").encode()[:-1] + b"", True, txqb.ConnectionLostError),
        (b"\x00" * CONNECTION_RESPONSE_SIZE, False, txqb.ProtocolError),
        (ConnectionResponse(0, 0, MAX, "relative", "", "").encode(), False, txqb.QBError),
        (ConnectionResponse(0, 7, MAX, "", "", "").encode(), False, txqb.QBError),
        (b"", False, txqb.QBTimeoutError),
    ],
    ids=["garbage", "short", "zeros", "bad-names", "bad-transport", "silent"],
)
@pytest_twisted.ensureDeferred
async def test_brokenServer(
    reactor: Any, serviceName: str, data: bytes, close: bool, error: type
) -> None:
    server = RawServer(serviceName)
    try:
        answered = deferToThread(server.answer, data, close)
        with pytest.raises(error):
            await txqb.connect(reactor, serviceName, timeout=1.0)
        await answered
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_connectCancelled(reactor: Any, serviceName: str) -> None:
    server = RawServer(serviceName)
    try:
        answered = deferToThread(server.answer, b"", False)
        d = txqb.connect(reactor, serviceName)
        await task.deferLater(reactor, 0.1, lambda: None)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await answered
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_malformedResponse(reactor: Any, serviceName: str) -> None:
    """A malformed response fails its own request; later ones pair fine."""

    class Junk(PeerHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            if msgId == 9:
                # Bytes no libqb peer would send, in place of the response.
                connection._channels.sendResponse(b"\x01\x02\x03")
                return None
            return super().messageReceived(connection, msgId, payload)

    service = txqb.listen(reactor, serviceName, Junk())
    client = await txqb.connect(reactor, serviceName)
    try:
        victim = client.request(9)
        after = client.request(0, b"after")
        with pytest.raises(txqb.ProtocolError):
            await victim
        assert (await after).payload == b"after"
    finally:
        await client.disconnect()
        await service.stopListening()


def test_writeToVanishedPeer(reactor: Any) -> None:
    """
    A write to a setup socket whose peer is gone (a SHM client killed
    during an event storm, its doorbells still to be written) reports the
    lost connection as Twisted's FileDescriptor expects, an exception
    instance, instead of raising inside the reactor.  (The poll reactors
    usually see the hang-up first; the write path is the race the soak
    run hit.)
    """
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from txqb._reactor.stream import SetupProtocol, UnixStreamTransport

    class Owner:
        def __init__(self) -> None:
            self.lost: List[Any] = []

        def _setupData(self, data: bytes) -> None:
            pass

        def _setupLost(self, reason: Any) -> None:
            self.lost.append(reason)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.close()
    owner = Owner()
    transport = UnixStreamTransport(ours, SetupProtocol(owner), reactor, b"\0test")  # type: ignore[arg-type]
    transport.write(b"\0" * 1000)
    why = transport.doWrite()  # type: ignore[no-untyped-call]
    assert isinstance(why, ConnectionLost), why
    reactor.removeWriter(transport)
    transport.connectionLost(Failure(why))
    assert [r.type for r in owner.lost] == [ConnectionLost]
