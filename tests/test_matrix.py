"""
libqb's own IPC test matrix (tests/check_ipc.c), in both roles: C libqb
clients against a txqb server (``test_cClient*``) and txqb clients against
a C libqb server (``test_txqbClient*``), each on SHM and on sockets, with
abstract and with filesystem setup sockets.

Only the cases test_interop.py does not already cover are here;
docs/matrix.rst maps every case to its tests.  The request ids are
libqb's test protocol as tests/peers/txqbpeer.py describes it.
"""

from __future__ import annotations

import errno
import glob
import os
import struct
from typing import Any, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, task

import txqb
from cprocs import CClient, CServer, TxqbServer, runClient
from peers.build import Peers
from peers.txqbpeer import BULK, BULK_EVENTS, CREATED_EVENT, DISPATCH, PUMP, SELF_FEED, MatrixHandlers
from test_interop import Env

_U32 = struct.Struct("<I")
_TIMEOUTS = (-errno.ETIMEDOUT, -errno.EAGAIN)

WHERE = [(t, n) for t in ("shm", "socket") for n in ("abstract", "filesystem")]


@pytest.fixture(params=WHERE, ids=[f"{t}-{n}" for t, n in WHERE])
def where(request: pytest.FixtureRequest, cpeers: Peers) -> Env:
    """Each transport, each setup-socket namespace."""
    transport, namespace = request.param
    return Env(namespace, cpeers, transport)


@pytest.fixture
def served(reactor: Any, serviceName: str, where: Env) -> Iterator[Tuple[txqb.Service, MatrixHandlers]]:
    """A txqb service speaking the matrix protocol, stopped afterwards."""
    handlers = MatrixHandlers()
    service = txqb.listen(
        reactor, serviceName, handlers, transport=where.transport, filesystemSockets=where.filesystem
    )
    yield service, handlers
    handlers.stopAll()
    pytest_twisted.blockon(service.stopListening())


def _cserver(reactor: Any, cpeers: Peers, name: str, where: Env, *args: str) -> CServer:
    return CServer(reactor, cpeers, name, "--transport", where.transport, *args, env=where.cenv)


async def _connect(reactor: Any, name: str, where: Env, **kw: Any) -> txqb.Client:
    return await txqb.connect(reactor, name, filesystemSockets=where.filesystem, **kw)


async def _until(reactor: Any, condition: Any, what: str, limit: int = 2000) -> None:
    """Let the reactor run until C{condition()} holds (at most ~20 s)."""
    for _ in range(limit):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"never happened: {what}")


def _received(lines: List[str], tag: str) -> List[Tuple[int, int, int]]:
    return [tuple(int(x) for x in line.split()[1:]) for line in lines if line.startswith(tag + " ")]  # type: ignore[misc]


def _soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


# 1, 2: async connect


@pytest_twisted.ensureDeferred
async def test_cClientAsyncConnect(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    """qb_ipcc_connect_async + poll + connect_continue, then a round trip."""
    code, lines = await runClient(
        reactor, cpeers, serviceName, "echo", "100", "auth", options=["--async", "1"], env=where.cenv
    )
    assert code == 0, lines
    assert lines[1:] == ["ECHO 100 ok", f"AUTH {os.getpid()} {os.getuid()} {os.getgid()}", "DONE"]


@pytest_twisted.ensureDeferred
async def test_txqbClientAsyncConnect(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    """connect() returns before the handshake is done; the reactor runs on."""
    async with await _cserver(reactor, cpeers, serviceName, where).start() as server:
        pending = txqb.connect(reactor, serviceName, filesystemSockets=where.filesystem)
        assert not pending.called
        client = await pending
        try:
            assert (await client.request(0, b"x")).payload == b"x"
            assert client.serverCredentials == (server.pid, os.getuid(), os.getgid())
        finally:
            await client.disconnect()
        await server.waitFor("DESTROYED")


# 5, 6: a response wait is not satisfied by an event


@pytest_twisted.ensureDeferred
async def test_cClientEventIsNoResponse(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    code, lines = await runClient(
        reactor, cpeers, serviceName, "send", "8", "0", "recv", "500", "evrecv", "5000", env=where.cenv
    )
    assert code == 0, lines
    (recv,) = _received(lines, "RECV")
    assert recv[0] in _TIMEOUTS, lines
    assert _received(lines, "EVRECV") == [(24, DISPATCH, 0)]


@pytest_twisted.ensureDeferred
async def test_txqbClientEventIsNoResponse(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, where).start():
        events: List[txqb.Message] = []
        client = await _connect(reactor, serviceName, where, eventReceived=events.append)
        try:
            with pytest.raises(txqb.QBTimeoutError):
                await client.request(DISPATCH, timeout=0.5)
            assert events == [txqb.Message(DISPATCH, 0, b"")]
        finally:
            await client.disconnect()


# 19, 20: requests answered on the event channel, growing sizes

SIZES = [32 << i for i in range(12)]  # 32 ... 65536, as libqb walks them
BIG = 131072  # libqb's 128 KiB test buffer


@pytest_twisted.ensureDeferred
async def test_cClientDispatch(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    commands: List[str] = []
    for size in SIZES:
        commands += ["send", str(DISPATCH), str(size), "evrecv", "5000"]
    code, lines = await runClient(
        reactor, cpeers, serviceName, *commands, options=["--max", str(BIG)], env=where.cenv
    )
    assert code == 0, lines
    assert _received(lines, "SENT") == [(16 + size,) for size in SIZES]
    assert _received(lines, "EVRECV") == [(24, DISPATCH, 0)] * len(SIZES)


@pytest_twisted.ensureDeferred
async def test_txqbClientDispatch(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, where).start():
        client = await _connect(reactor, serviceName, where, maxMessageSize=BIG)
        try:
            stream = client.events()
            for size in SIZES:
                await client.send(DISPATCH, bytes(size))
                assert await stream.__anext__() == txqb.Message(DISPATCH, 0, b"")
            assert client.outstanding == 0
        finally:
            await client.disconnect()


# 21, 22: bulk events around a response, with an oversize event


@pytest_twisted.ensureDeferred
async def test_cClientBulkEvents(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    _, handlers = served
    commands = ["send", str(BULK), "0", "recv", "5000"] + ["evrecv", "5000"] * BULK_EVENTS + ["evrecv", "200"]
    code, lines = await runClient(reactor, cpeers, serviceName, *commands, env=where.cenv)
    assert code == 0, lines
    assert handlers.bulkChecks == []
    assert _received(lines, "RECV") == [(24, BULK, 0)]
    events = _received(lines, "EVRECV")
    assert events[:-1] == [(24, BULK, 0)] * BULK_EVENTS
    assert events[-1][0] in _TIMEOUTS  # exactly ten


@pytest_twisted.ensureDeferred
async def test_txqbClientBulkEvents(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, where).start() as server:
        events: List[txqb.Message] = []
        client = await _connect(reactor, serviceName, where, eventReceived=events.append)
        try:
            assert await client.request(BULK) == txqb.Message(BULK, 0, b"")
            await _until(reactor, lambda: len(events) >= BULK_EVENTS, "ten events")
            assert (await client.request(0, b"after")).payload == b"after"
            assert events == [txqb.Message(BULK, 0, b"")] * BULK_EVENTS
            # The server's stdout is another pipe: its line may arrive
            # after the responses.
            queue = await server.waitFor("BULKQUEUE")
            assert not [line for line in server.lines if "FAIL" in line]
            before, after = map(int, queue.split()[1:])
            assert after in (before, before + 1)  # this client may read in between
        finally:
            await client.disconnect()


# 23, 24: an event sent inside connection_created is not lost


@pytest_twisted.ensureDeferred
async def test_cClientEventOnCreated(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    served[1].eventOnCreated = True
    code, lines = await runClient(reactor, cpeers, serviceName, "evrecv", "5000", "evrecv", "200", env=where.cenv)
    assert code == 0, lines
    first, second = _received(lines, "EVRECV")
    assert first == (24, CREATED_EVENT, 0)
    assert second[0] in _TIMEOUTS


@pytest_twisted.ensureDeferred
async def test_txqbClientEventOnCreated(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, where, "--event-on-created", "1").start():
        client = await _connect(reactor, serviceName, where)
        try:
            first = client.events().__anext__()
            assert await defer.Deferred.fromCoroutine(first).addTimeout(10, reactor) == txqb.Message(  # type: ignore[arg-type]
                CREATED_EVENT, 0, b""
            )
            assert (await client.request(0, b"x")).payload == b"x"
            assert client.eventsReceived == 1
        finally:
            await client.disconnect()


# 13-16: the server exits inside a handler after a good round trip


@pytest_twisted.ensureDeferred
async def test_cClientServerExits(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    """A txqb server process _exits mid-request; the C client sees it, nothing is left."""
    args = ["--transport", where.transport] + (["--filesystem"] if where.filesystem else [])
    server = await TxqbServer(reactor, cpeers, serviceName, *args).start()
    try:
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "10", "die", env=where.cenv)
        assert code == 0, lines
        (died,) = [line for line in lines if line.startswith("DIED")]
        rc, connected = died.split()[1:]
        assert int(rc) in (-errno.ENOTCONN, -errno.ECONNRESET), lines
        assert connected == "connected=0"
        assert await server.proto.ended == 0
        assert "DYING" in server.lines
        left = glob.glob(f"/dev/shm/qb-{server.pid}-*")
        if where.transport == "shm":
            # libqb 2.0.6's client unlinks a dead server's ring files but
            # leaves their empty directory (its resources.test expects
            # such empty leftovers); the files must be gone.
            assert len(left) == 1 and os.listdir(left[0]) == [], left
            os.rmdir(left[0])
        else:
            assert left == []
    finally:
        server.kill()
        await server.proto.ended
        if where.filesystem and os.path.exists(f"/tmp/{serviceName}"):
            os.unlink(f"/tmp/{serviceName}")  # a dead server's socket file, as with C


# 27, 28: connection churn against one server


# libqb's full count: about 1-3 s per combination (the C client in one
# process, the txqb client in the test's reactor); --soak runs ten times that.
def _cycles(request: pytest.FixtureRequest) -> int:
    return 50000 if _soak(request) else 5000


@pytest_twisted.ensureDeferred
async def test_cClientConnectionChurn(
    reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any, request: pytest.FixtureRequest
) -> None:
    service, handlers = served
    n = _cycles(request)
    code, lines = await runClient(
        reactor, cpeers, serviceName, "echo", "10", options=["--cycles", str(n)], env=where.cenv, timeout=300
    )
    assert code == 0, lines
    assert lines[0] == f"CYCLES ok={n} fail=0 errno=0"
    await _until(reactor, lambda: handlers.names().count("destroyed") == n + 1, "all destroyed")
    assert service.connections == []


@pytest_twisted.ensureDeferred
async def test_txqbClientConnectionChurn(
    reactor: Any, cpeers: Peers, serviceName: str, where: Env, request: pytest.FixtureRequest
) -> None:
    n = _cycles(request)
    async with await _cserver(reactor, cpeers, serviceName, where).start() as server:
        for _ in range(n):
            client = await _connect(reactor, serviceName, where)
            await client.disconnect()
        client = await _connect(reactor, serviceName, where)
        try:
            assert (await client.request(0, b"x")).payload == b"x"
        finally:
            await client.disconnect()
        await _until(reactor, lambda: server.lines.count("DESTROYED") == n + 1, "all destroyed")


# 29, 30: the service is destroyed with live connections and queued events


@pytest_twisted.ensureDeferred
async def test_cClientServiceDestroyedLive(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    service, handlers = served
    client = CClient(
        reactor, cpeers, serviceName, ["send", str(PUMP), "0", "sleep", "300", "waitclose", "10000"], env=where.cenv
    ).start()
    await _until(reactor, lambda: any(n > 20 for n in handlers.pumped.values()), "events pumped")
    (conn,) = service.connections
    await _until(reactor, lambda: conn.eventQueueLength() > 0, "events queued")
    await service.stopListening()
    assert handlers.names()[-2:] == ["closed", "destroyed"]
    assert handlers.pumps == {}
    code, lines = await client.finish()
    assert code == 0, lines
    assert lines[-2].startswith("CLOSEDBYPEER") and lines[-1] == "DONE", lines


@pytest_twisted.ensureDeferred
async def test_txqbClientServiceDestroyedLive(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    server = await _cserver(reactor, cpeers, serviceName, where).start()
    client = await _connect(reactor, serviceName, where)
    try:
        stream = client.events(highWater=1)
        await client.request(6, _U32.pack(50))  # 50 events, left unread
        assert await server.stop() == 0  # qb_ipcs_destroy with the client live
        assert server.lines[-1] == "BYE"
        await client.whenDisconnected()
        assert not client.connected
        # What had arrived is still there, then the stream ends.
        seen: List[txqb.Message] = []
        with pytest.raises(txqb.ConnectionLostError):
            async for event in stream:
                seen.append(event)
        assert [e.payload for e in seen] == [_U32.pack(i) for i in range(len(seen))]
    finally:
        await client.disconnect()


# 31: ownership set in connection_accept (txqb as server: test_interop)


@pytest_twisted.ensureDeferred
async def test_txqbClientServerPerms(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    """A C server's auth_set owns the files a txqb client maps."""
    async with await _cserver(reactor, cpeers, serviceName, where, "--auth", "555:741:660").start() as server:
        client = await _connect(reactor, serviceName, where)
        try:
            (directory,) = glob.glob(f"/dev/shm/qb-{server.pid}-{os.getpid()}-*")
            files = [os.stat(os.path.join(directory, n)) for n in os.listdir(directory)]
            assert len(files) == (6 if where.transport == "shm" else 1)
            for info in files:
                assert info.st_mode & 0o777 == 0o660
                if os.getuid() == 0:
                    assert (info.st_uid, info.st_gid) == (555, 741)
            assert (await client.request(0, b"x")).payload == b"x"
        finally:
            await client.disconnect()
        await server.waitFor("DESTROYED")


# 32-35: a busy high-priority source does not starve new connections


@pytest_twisted.ensureDeferred
async def test_cClientNotStarved(reactor: Any, cpeers: Peers, serviceName: str, where: Env, served: Any) -> None:
    _, handlers = served
    code, lines = await runClient(reactor, cpeers, serviceName, "feed", "60000", env=where.cenv)
    assert (code, lines[1]) == (0, "FEED 0"), lines
    (feed,) = handlers.feeds
    code, lines = await runClient(reactor, cpeers, serviceName, "echo", "10", env=where.cenv)
    assert code == 0, lines
    # The new client got in while the feeder was busy, not after it.
    assert feed.running and feed.rounds > 0


@pytest_twisted.ensureDeferred
async def test_txqbClientNotStarved(reactor: Any, cpeers: Peers, serviceName: str, where: Env) -> None:
    async with await _cserver(reactor, cpeers, serviceName, where).start() as server:
        feeder = await _connect(reactor, serviceName, where)
        try:
            assert (await feeder.request(SELF_FEED, _U32.pack(60000))).error == 0
            await server.waitFor("FEEDING")
            late = await _connect(reactor, serviceName, where)
            try:
                assert (await late.request(0, b"x")).payload == b"x"
            finally:
                await late.disconnect()
            assert not [line for line in server.lines if line.startswith("FEEDEND")]
        finally:
            await feeder.disconnect()
