"""
txqb against Debian's real libqb, in both roles: C libqb clients
(tests/peers/qbclient.c) against a txqb server, and txqb clients against a
C libqb server (tests/peers/qbserver.c); each over ``QB_IPC_SOCKET`` and
``QB_IPC_SHM``, with abstract and with filesystem setup sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, task

import txqb
from cprocs import CClient, CServer, runClient
from handlers import PeerHandlers
from peers.build import Peers
from txqb._wire.handshake import ConnectionRequest, ConnectionResponse
from txqb.echo import eventPayload

_U32 = struct.Struct("<I")


def _fsEnv(cpeers: Peers) -> Dict[str, str]:
    return {"LD_PRELOAD": str(cpeers.fsShim)}


@pytest.fixture(params=["abstract", "filesystem"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each test runs with abstract and with filesystem setup sockets."""
    return str(request.param)


class Env:
    """Mode-dependent settings for both sides."""

    def __init__(self, mode: str, cpeers: Peers, transport: str = "socket") -> None:
        self.filesystem = mode == "filesystem"
        self.cenv = _fsEnv(cpeers) if self.filesystem else None
        self.transport = transport


@pytest.fixture(params=["socket", "shm"])
def env(request: pytest.FixtureRequest, mode: str, cpeers: Peers) -> Env:
    """Settings for txqb client tests: each transport, each namespace."""
    return Env(mode, cpeers, str(request.param))


@pytest.fixture(params=["socket", "shm"])
def senv(request: pytest.FixtureRequest, mode: str, cpeers: Peers) -> Env:
    """Settings for txqb server tests: each transport, each namespace."""
    return Env(mode, cpeers, str(request.param))


async def _serve(reactor: Any, name: str, env: Env, handlers: Optional[PeerHandlers] = None, **kw: Any) -> txqb.Service:
    return txqb.listen(
        reactor,
        name,
        handlers or PeerHandlers(),
        transport=env.transport,
        filesystemSockets=env.filesystem,
        **kw,
    )


# C libqb client -> txqb server


@pytest_twisted.ensureDeferred
async def test_cClientEcho(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """Every payload size up to the maximum, and a local -EMSGSIZE."""
    handlers = PeerHandlers()
    service = await _serve(reactor, serviceName, senv, handlers)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "sweep", "1021", "oversize", "echos", "2000", "32",
            "auth", options=["--max", "70000"], env=senv.cenv,
        )
        assert code == 0, lines
        assert lines[0] == "CONNECTED 70000"
        assert "OVERSIZE -90" in lines
        assert "ECHOS 2000 ok" in lines
        assert f"AUTH {os.getpid()} {os.getuid()} {os.getgid()}" in lines
        accept = dict(handlers.calls)["accept"]
        assert accept[1:] == (os.getuid(), os.getgid())
        assert accept[0] > 0 and accept[0] != os.getpid()
        await handlers.allClosed()
        assert handlers.names() == ["accept", "created", "closed", "destroyed"]
        if senv.filesystem:
            assert os.path.exists(f"/tmp/{serviceName}")
    finally:
        await service.stopListening()
    assert not os.path.exists(f"/tmp/{serviceName}")


@pytest_twisted.ensureDeferred
async def test_cClientEvents(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    service = await _serve(reactor, serviceName, senv)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "events", "3000", "64", "events", "20", "65512",
            "evresp", "50", env=senv.cenv,
        )
        assert code == 0, lines
        assert lines[1:] == ["EVENTS 3000 ok", "EVENTS 20 ok", "EVRESP 50 ok", "DONE"]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientMegabyte(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """1 MiB messages: sizes up to the maximum, chunks that wrap the rings."""
    service = await _serve(reactor, serviceName, senv)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "sweep", "65521", "echos", "20", "700000",
            "oversize", options=["--max", str(1 << 20)], env=senv.cenv, timeout=120,
        )
        assert code == 0, lines
        assert lines[0] == f"CONNECTED {1 << 20}"
        assert lines[1:] == ["SWEEP 18 ok", "ECHOS 20 ok", "OVERSIZE -90", "DONE"]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientEventStorm(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """30 000 events with a sequence check, then maximal ones, none lost."""
    service = await _serve(reactor, serviceName, senv)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "events", "30000", "32", "events", "200", "65512",
            env=senv.cenv, timeout=120,
        )
        assert code == 0, lines
        assert lines[1:] == ["EVENTS 30000 ok", "EVENTS 200 ok", "DONE"]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientAuthSet(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """setAuth in accept owns the directory and files (libqb's server_perms case)."""
    seen: Dict[str, Any] = {}

    class Owned(PeerHandlers):
        def connectionCreated(self, connection: Any) -> None:
            directory = os.path.dirname(connection.description)
            seen["dir"] = os.stat(directory)
            seen["files"] = {n: os.stat(os.path.join(directory, n)) for n in os.listdir(directory)}
            super().connectionCreated(connection)

    service = await _serve(reactor, serviceName, senv, Owned(auth=(555, 741, 0o660)))
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "100", env=senv.cenv)
        assert code == 0, lines
        directory = seen["dir"]
        assert directory.st_mode & 0o777 == 0o770
        if os.getuid() == 0:
            # libqb re-chowns only SHM directories; txqb does it for both.
            assert (directory.st_uid, directory.st_gid) == (555, 741)
        files = seen["files"]
        assert len(files) == (6 if senv.transport == "shm" else 1)
        for info in files.values():
            assert info.st_mode & 0o777 == 0o660
            if os.getuid() == 0:
                assert (info.st_uid, info.st_gid) == (555, 741)
        if senv.transport == "shm":  # sizes exactly as libqb makes them
            for name, info in files.items():
                assert info.st_size == (8252 if name.endswith("-header") else 69632), name
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientRefused(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    handlers = PeerHandlers(refuse=errno.EACCES)
    service = await _serve(reactor, serviceName, senv, handlers)
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "auth", env=senv.cenv)
        assert (code, lines) == (2, ["CONNECT_FAIL 13"])
        assert handlers.names() == ["accept", "destroyed"]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientEnforcedAndCeiling(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """The server's floor raises the size; its ceiling refuses with EMSGSIZE."""
    service = await _serve(
        reactor, serviceName, senv, enforceBufferSize=200000, maxMessageSizeCeiling=1 << 20
    )
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "199976", env=senv.cenv)
        assert code == 0, lines
        assert lines[:2] == ["CONNECTED 200000", "ECHO 199976 ok"]
        code, lines = await runClient(
            reactor, cpeers, serviceName, "auth", options=["--max", str(64 << 20)], env=senv.cenv
        )
        assert (code, lines) == (2, [f"CONNECT_FAIL {errno.EMSGSIZE}"])
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientFlowControl(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """RATE_OFF makes a C client's sends fail with -EAGAIN until it is lifted."""
    handlers = PeerHandlers()
    service = await _serve(reactor, serviceName, senv, handlers)
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "fc", "2", "300", env=senv.cenv)
        assert code == 0, lines
        eagain = int(lines[1].split("=")[1])
        assert eagain > 10, lines
        # RATE_OFF_2 with the default fc_enable_max 1: the C client sends
        # anyway, and the server holds the request unread until the rate
        # is lifted, then answers.
        code, lines = await runClient(reactor, cpeers, serviceName, "fc", "3", "300", env=senv.cenv)
        assert code == 0, lines
        assert lines[1] == "FC eagain=0"
    finally:
        handlers.cancelTimers()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientKicked(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    service = await _serve(reactor, serviceName, senv)
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "kick", env=senv.cenv)
        assert code == 0, lines
        assert lines[1].startswith("KICKED")
        assert service.connections == []
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_cClientKilledMidRequest(reactor: Any, cpeers: Peers, serviceName: str, senv: Env) -> None:
    """A C client killed while its request is being served: files go, others go on."""
    gate: defer.Deferred[bytes] = defer.Deferred()

    class Slow(PeerHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            if msgId == 9:
                return gate
            return super().messageReceived(connection, msgId, payload)

    handlers = Slow()
    service = await _serve(reactor, serviceName, senv, handlers)
    try:
        victim = CClient(reactor, cpeers, serviceName, ["send", "9", "10", "hang"], env=senv.cenv).start()
        await victim.waitFor("HANGING")
        assert len(service.connections) == 1
        victim.kill()
        await victim.finish()
        while service.connections:
            await task.deferLater(reactor, 0.01, lambda: None)
        gate.callback(b"late")  # answering a dead client is harmless
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "10", env=senv.cenv)
        assert code == 0, lines
    finally:
        await service.stopListening()


# txqb client -> C libqb server


async def _cserver(reactor: Any, cpeers: Peers, name: str, env: Env, *args: str) -> CServer:
    return await CServer(reactor, cpeers, name, "--transport", env.transport, *args, env=env.cenv).start()


async def _connect(reactor: Any, name: str, env: Env, **kw: Any) -> txqb.Client:
    return await txqb.connect(reactor, name, filesystemSockets=env.filesystem, **kw)


@pytest_twisted.ensureDeferred
async def test_txqbClientEcho(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, env) as server:
        client = await _connect(reactor, serviceName, env, maxMessageSize=70000)
        try:
            assert client.maxMessageSize == 70000
            assert client.serverCredentials == (server.pid, os.getuid(), os.getgid())
            for size in list(range(0, 70000 - 24, 4093)) + [70000 - 24]:
                payload = os.urandom(size)
                assert await client.request(0, payload) == txqb.Message(0, 0, payload)
            with pytest.raises(txqb.MessageTooLargeError) as e:
                await client.request(0, bytes(70000 - 15))
            assert e.value.errno == errno.EMSGSIZE
            assert (await client.request(99)).error == -errno.EINVAL
        finally:
            await client.disconnect()
        await server.waitFor("DESTROYED")


@pytest_twisted.ensureDeferred
async def test_txqbClientPipelined(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    """10 000 requests outstanding at once, each answered in order."""
    async with await _cserver(reactor, cpeers, serviceName, env):
        client = await _connect(reactor, serviceName, env)
        try:
            ds = [client.request(0, b"%d" % i) for i in range(10000)]
            results = await defer.gatherResults(ds, consumeErrors=True)
            assert [r.payload for r in results] == [b"%d" % i for i in range(10000)]
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientCancelKeepsPairing(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    """A cancelled request's late reply is dropped, not given to the next."""
    async with await _cserver(reactor, cpeers, serviceName, env):
        client = await _connect(reactor, serviceName, env)
        try:
            first = client.request(0, b"first")
            second = client.request(0, b"second")
            first.cancel()
            with pytest.raises(defer.CancelledError):
                await first
            assert (await second).payload == b"second"
            # RATE_OFF_2: a default client still sends, and the server holds
            # the request unread for 300 ms; it times out while on the wire.
            await client.request(3, _U32.pack(300))
            third = client.request(0, b"third", timeout=0.1)
            with pytest.raises(txqb.QBTimeoutError):
                await third
            # RATE_OFF: this one times out while held back in the client.
            await client.request(2, _U32.pack(300))
            held = client.request(0, b"held", timeout=0.1)
            with pytest.raises(txqb.QBTimeoutError):
                await held
            assert (await client.request(0, b"fourth")).payload == b"fourth"
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientMegabyte(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    """1 MiB messages from a txqb client to a C server, wrapping the rings."""
    async with await _cserver(reactor, cpeers, serviceName, env):
        client = await _connect(reactor, serviceName, env, maxMessageSize=1 << 20)
        try:
            for size in (0, 1, 65536, 700000, 700000, 700000, (1 << 20) - 24):
                payload = os.urandom(size)
                assert (await client.request(0, payload)).payload == payload
                # Gathered (sendv): parts of every buffer kind, across the
                # ring's end as often as not.
                view = memoryview(payload)
                a = min(1, size)
                b = max(a, size // 3)
                parts = [view[:a], bytearray(view[a:b]), bytes(view[b:])]
                assert (await client.request(0, parts)).payload == payload
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientEventStorm(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    """30 000 events from a C server, then maximal ones, in order."""
    async with await _cserver(reactor, cpeers, serviceName, env):
        count = [0]

        def check(event: txqb.Message) -> None:
            assert event.payload[:4] == _U32.pack(count[0] % 30000 if count[0] < 30000 else count[0] - 30000)
            count[0] += 1

        client = await _connect(reactor, serviceName, env, eventReceived=check)
        try:
            await client.request(1, struct.pack("<II", 30000, 32))
            big = client.maxMessageSize - 24
            await client.request(1, struct.pack("<II", 50, big))
            assert count[0] == 30050
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientEvents(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, env):
        received: List[txqb.Message] = []
        client = await _connect(reactor, serviceName, env, eventReceived=received.append)
        try:
            reply = await client.request(1, struct.pack("<II", 5000, 64))
            assert reply == txqb.Message(1, 0, _U32.pack(5000))
            # Events sent before a response are delivered before it.
            assert len(received) == 5000
            for seq, event in enumerate(received):
                assert event == txqb.Message(1, 0, eventPayload(seq, 64))
            stream = client.events()
            big = client.maxMessageSize - 24
            reply = await client.request(1, struct.pack("<II", 10, big))
            for seq in range(10):
                event = await stream.__anext__()
                assert event.payload == eventPayload(seq, big)
        finally:
            await client.disconnect()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()


@pytest_twisted.ensureDeferred
async def test_txqbClientEnforced(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, env, "--enforce", "200000"):
        client = await _connect(reactor, serviceName, env, maxMessageSize=1000)
        try:
            assert client.maxMessageSize == 200000
            payload = os.urandom(200000 - 24)
            assert (await client.request(0, payload)).payload == payload
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientRefused(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, env, "--refuse", "13") as server:
        with pytest.raises(txqb.RefusedError) as e:
            await _connect(reactor, serviceName, env)
        assert e.value.errno == errno.EACCES
        await server.waitFor("DESTROYED")


@pytest_twisted.ensureDeferred
async def test_txqbClientNoService(reactor: Any, serviceName: str, env: Env) -> None:
    with pytest.raises(txqb.ServiceNotFoundError):
        await _connect(reactor, serviceName, env)


@pytest_twisted.ensureDeferred
async def test_txqbClientFlowControl(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    """Sends wait (never fail) while a C server has flow control on."""
    async with await _cserver(reactor, cpeers, serviceName, env) as server:
        client = await _connect(reactor, serviceName, env)
        try:
            await client.request(2, _U32.pack(300))
            start = reactor.seconds()
            sent = client.send(0, b"held")
            reply = client.request(0, b"after")
            assert not sent.called
            await sent
            assert (await reply).payload == b"held"  # the send's echo comes first
            assert reactor.seconds() - start >= 0.25
            assert client.flowControlWaits >= 1
            await server.waitFor("FCOFF")
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientFlowControlOffBetweenReads(reactor: Any, cpeers: Peers, serviceName: str,
                                                  env: Env) -> None:
    """
    A server may turn flow control off at any moment, between any two
    reads of its word: a held request is still polled for and sent.  The
    word is scripted (on, on, then the C server's own), so the moment
    falls inside the client's look at its queue.
    """
    async with await _cserver(reactor, cpeers, serviceName, env):
        client = await _connect(reactor, serviceName, env)
        try:
            channels: Any = client._channels
            real = channels.flowControl
            script = [1, 1, 0]
            channels.flowControl = lambda: script.pop(0) if script else real()
            reply = client.request(0, b"held", timeout=5)
            assert not reply.called
            assert (await reply).payload == b"held"
            assert script == [] and client.flowControlWaits >= 2
        finally:
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_txqbClientServerDisconnects(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, env):
        client = await _connect(reactor, serviceName, env)
        pending = client.request(4)
        with pytest.raises(txqb.ConnectionLostError):
            await pending
        await client.whenDisconnected()
        assert not client.connected
        with pytest.raises(txqb.ConnectionLostError):
            await client.request(0)


@pytest_twisted.ensureDeferred
async def test_txqbClientServerDies(reactor: Any, cpeers: Peers, serviceName: str, env: Env) -> None:
    server = await _cserver(reactor, cpeers, serviceName, env)
    try:
        client = await _connect(reactor, serviceName, env)
        try:
            outstanding = [client.request(0, b"x") for _ in range(3)]
            dying = client.request(5)
            # Nothing more is sent until the server is gone: a datagram sent
            # to a dead peer makes Linux purge the sender's queue, replies
            # and all.
            await defer.gatherResults(outstanding, consumeErrors=True)
            with pytest.raises(txqb.ConnectionLostError):
                await dying
            assert await server.proto.ended == 0
            with pytest.raises(txqb.ConnectionLostError):
                await client.request(0, b"after")
        finally:
            await client.disconnect()
    finally:
        server.kill()
        await server.proto.ended
        if env.filesystem and os.path.exists(f"/tmp/{serviceName}"):
            # A C server that dies leaves its socket file; the next one
            # would unlink it.  Do that here so nothing outlives the test.
            os.unlink(f"/tmp/{serviceName}")


# Live golden captures


@pytest_twisted.ensureDeferred
async def test_goldenConnectionRequest(reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """A real C client's connection request is byte for byte ours."""
    from twisted.internet.threads import deferToThread

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0" + serviceName.encode().ljust(107, b"\0"))
    listener.listen(1)
    listener.settimeout(20)

    def capture() -> bytes:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            data = b""
            while len(data) < 24:
                data += conn.recv(24 - len(data))
            conn.sendall(ConnectionResponse.refusal(errno.EPERM).encode())
            return data

    captured = deferToThread(capture)
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "auth", options=["--max", "5000"])
        data = await captured
    finally:
        listener.close()
    assert data == ConnectionRequest(12328).encode()  # C clients raise 5000 to 12328
    assert (code, lines) == (2, [f"CONNECT_FAIL {errno.EPERM}"])


@pytest_twisted.ensureDeferred
async def test_goldenConnectionResponse(reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """A real C server's connection response decodes to what we expect."""
    from twisted.internet.threads import deferToThread

    async with await CServer(reactor, cpeers, serviceName, "--transport", "socket").start() as server:

        def capture() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                s.connect(b"\0" + serviceName.encode().ljust(107, b"\0"))
                s.sendall(ConnectionRequest(12328).encode())
                data = b""
                while len(data) < 12328:
                    chunk = s.recv(12328 - len(data))
                    if not chunk:
                        break
                    data += chunk
                return data

        raw = await deferToThread(capture)
        response = ConnectionResponse.decode(raw)
        assert response.error == 0 and response.transport == 0
        assert response.maxMessageSize == 12328
        prefix = f"/dev/shm/qb-{server.pid}-{os.getpid()}-"
        assert response.request.startswith(prefix)
        assert response.request.endswith(f"/qb-control-{serviceName}")
        assert response.response == response.request.replace(f"qb-control-{serviceName}", f"qb-{serviceName}")
        assert response.event == ""
        assert ConnectionResponse(**{**response._asdict()}).encode() == raw
        await server.waitFor("DESTROYED")
