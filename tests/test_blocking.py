"""
txqb.blocking against C libqb servers (qbserver) on both transports, and
against a txqb server: requests, events, timeouts, refusal, a missing
service, oversized messages, a server that dies; and it never imports
Twisted.

The blocking calls run in a thread (deferToThread) so that the reactor
keeps running the C server's process plumbing and any txqb server.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from typing import Any, Callable, TypeVar

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

import txqb
from cprocs import CServer
from peers.build import Peers
from txqb import blocking
from txqb._wire.naming import abstractAddress
from txqb.echo import EchoHandlers, eventPayload
from txqb.errors import (
    ConnectionLostError,
    MessageTooLargeError,
    QBTimeoutError,
    RefusedError,
    ServiceNotFoundError,
)

T = TypeVar("T")
_U32 = struct.Struct("<I")
_EVENTS = struct.Struct("<II")


async def _inThread(call: Callable[[], T]) -> T:
    result: T = await deferToThread(call)
    return result


@pytest.fixture(params=["socket", "shm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_noTwisted() -> None:
    """Importing the blocking client (or the txqb command) loads no Twisted."""
    code = (
        "import sys, txqb.blocking, txqb._cli;"
        "loaded = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.'));"
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_publicNamesStillThere() -> None:
    """The package's lazy names resolve to the modules' own objects."""
    from txqb import client, errors, server

    assert txqb.connect is client.connect
    assert txqb.listen is server.listen
    assert txqb.RATE_OFF_2 == server.RATE_OFF_2
    assert txqb.QBError is errors.QBError
    assert set(txqb.__all__) <= set(dir(txqb))
    with pytest.raises(AttributeError):
        txqb.noSuchName  # noqa: B018


@pytest_twisted.ensureDeferred
async def test_requestsAndEvents(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """Echo, an error response and a burst of events, from a C server."""
    async with CServer(reactor, cpeers, serviceName, "--transport", transport) as server:

        def talk() -> Any:
            with blocking.connect(serviceName, timeout=10) as client:
                assert client.transportType == (1 if transport == "shm" else 0)
                assert client.serverCredentials.pid == server.pid
                echoed = client.request(0, b"hello", timeout=10)
                gathered = client.request(0, [b"he", bytearray(b"ll"), memoryview(b"o")])
                assert gathered == echoed
                invalid = client.request(99, b"", timeout=10)
                burst = client.request(1, _EVENTS.pack(5, 64), timeout=10)
                events = [client.receiveEvent(10) for _ in range(5)]
                return echoed, invalid, burst, events

        echoed, invalid, burst, events = await _inThread(talk)
    assert echoed == txqb.Message(0, 0, b"hello")
    assert invalid == txqb.Message(99, -errno.EINVAL, b"")
    assert burst.error == 0 and burst.payload[:4] == _U32.pack(5)
    assert [e.payload for e in events] == [eventPayload(i, 64) for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_timeouts(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """
    With the C server's flow control on, a send times out; ignoring flow
    control, a request sits unread and times out, and its late response is
    dropped so that the next request gets its own.  An event wait times out.
    """
    async with CServer(reactor, cpeers, serviceName, "--transport", transport) as server:

        def heldBack() -> str:
            with blocking.connect(serviceName, timeout=10) as client:
                client.request(2, _U32.pack(2000), timeout=10)  # rate limit off for 2 s
                with pytest.raises(QBTimeoutError) as caught:
                    client.send(0, b"held", timeout=0.1)
                return str(caught.value)

        assert "kept flow control on" in await _inThread(heldBack)
        await server.waitFor("FCOFF")

        def late() -> Any:
            with blocking.connect(serviceName, timeout=10, fcEnableMax=0) as client:
                client.request(2, _U32.pack(1000), timeout=10)
                with pytest.raises(QBTimeoutError):
                    client.request(0, b"late", timeout=0.05)
                with pytest.raises(QBTimeoutError):
                    client.receiveEvent(0.05)
                return client.request(0, b"next", timeout=20)

        assert await _inThread(late) == txqb.Message(0, 0, b"next")


@pytest_twisted.ensureDeferred
async def test_refused(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """A C server's accept policy refusal arrives with its errno."""
    async with CServer(reactor, cpeers, serviceName, "--transport", transport, "--refuse", "13"):
        with pytest.raises(RefusedError) as caught:
            await _inThread(lambda: blocking.connect(serviceName, timeout=10))
    assert caught.value.errno == errno.EACCES
    assert "refused" in str(caught.value)


def test_noSuchService(serviceName: str) -> None:
    with pytest.raises(ServiceNotFoundError) as caught:
        blocking.connect(serviceName, timeout=1)
    assert caught.value.errno == errno.ECONNREFUSED
    with pytest.raises(ValueError):
        blocking.connect("a/b")


def test_handshakeTimeout(serviceName: str) -> None:
    """A listener that never answers the handshake: a timeout, not a hang."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(abstractAddress(serviceName.encode()))
        sock.listen(1)
        with pytest.raises(QBTimeoutError, match="did not answer"):
            blocking.connect(serviceName, timeout=0.1)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_tooLarge(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """
    A request beyond the negotiated size is refused before sending and the
    connection stays usable; the C server answers an event too large for
    the client with -EMSGSIZE.
    """
    async with CServer(reactor, cpeers, serviceName, "--transport", transport):

        def talk() -> Any:
            with blocking.connect(serviceName, maxMessageSize=20000, timeout=10) as client:
                size = client.maxMessageSize
                with pytest.raises(MessageTooLargeError) as caught:
                    client.request(0, bytes(size), timeout=10)
                fits = client.request(0, bytes(size - 16), timeout=10)
                bigEvent = client.request(1, _EVENTS.pack(1, size), timeout=10)
                return caught.value.errno, len(fits.payload), size, bigEvent.error

        code, echoed, size, eventError = await _inThread(talk)
    assert code == errno.EMSGSIZE
    assert echoed == size - 16
    assert eventError == -errno.EMSGSIZE


@pytest_twisted.ensureDeferred
async def test_serverDies(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """A server that dies mid-request: ConnectionLostError, then not connected."""
    async with CServer(reactor, cpeers, serviceName, "--transport", transport) as server:

        def talk() -> bool:
            client = blocking.connect(serviceName, timeout=10)
            with pytest.raises(ConnectionLostError):
                client.request(5, b"", timeout=20)
            connected = client.connected
            with pytest.raises(ConnectionLostError):
                client.request(0, b"", timeout=1)
            client.close()
            return connected

        assert await _inThread(talk) is False
        await server.waitFor("DYING")


@pytest_twisted.ensureDeferred
async def test_txqbServer(reactor: Any, serviceName: str, transport: str) -> None:
    """Against txqb's own server: echo, events, and its size ceiling's refusal."""
    service = txqb.listen(
        reactor, serviceName, EchoHandlers(), transport=transport, maxMessageSizeCeiling=1 << 20
    )
    try:

        def talk() -> Any:
            with blocking.connect(serviceName, timeout=10) as client:
                echoed = client.request(0, b"\x00\xffbinary", timeout=10)
                client.request(1, _EVENTS.pack(3, 16), timeout=10)
                events = [client.receiveEvent(10).payload for _ in range(3)]
            with pytest.raises(RefusedError) as caught:
                blocking.connect(serviceName, maxMessageSize=2 << 20, timeout=10)
            return echoed, events, caught.value.errno

        echoed, events, refusal = await _inThread(talk)
    finally:
        await service.stopListening()
    assert echoed.payload == b"\x00\xffbinary"
    assert events == [eventPayload(i, 16) for i in range(3)]
    assert refusal == errno.EMSGSIZE


@pytest_twisted.ensureDeferred
async def test_connectUsesFlagFileDefault(reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """A C server on a filesystem socket is reached with filesystemSockets=True."""
    env = {"LD_PRELOAD": str(cpeers.fsShim)}
    async with CServer(reactor, cpeers, serviceName, env=env):
        assert os.path.exists(f"/tmp/{serviceName}")

        def talk() -> bytes:
            with blocking.connect(serviceName, timeout=10, filesystemSockets=True) as client:
                return client.request(0, b"fs", timeout=10).payload

        assert await _inThread(talk) == b"fs"
