"""
Beyond libqb's own suite: hostile input and hostile timing, against real
libqb where its behaviour is visible, and against txqb in both roles.

* malformed request headers that Debian's libqb 2.0.6 mishandles (one of
  them corrupts its heap) and that a txqb server refuses;
* a corrupted event ring under a txqb client;
* SIGKILL of either peer at each phase (right after connecting, mid-
  request, mid-event-storm);
* 1000 refused connects and 1000 connect/kill cycles: fds and ``/dev/shm``
  back to their baseline;
* service names of every length libqb can use, and longer ones refused;
* an event storm into a client that stops reading and then resumes: every
  event arrives, in order, and the server does not spin meanwhile.

What test_badinput.py and test_shm_hostile.py already cover (malformed
headers in general, reserved ids, silent clients, a corrupted ring,
pre-created names, a full ``/dev/shm``) is not repeated; docs/matrix.rst
maps it all.
"""

from __future__ import annotations

import errno
import glob
import mmap
import os
import resource
import shutil
import signal
import struct
from typing import Any, Callable, List

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

import txqb
from conftest import _allShm, shmLeftSince
from cprocs import CClient, CServer, TxqbServer, runClient
from peers.build import Peers
from peers.txqbpeer import HOLD, MatrixHandlers
from test_badinput import CASES, RawClient
from test_matrix import _until
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.naming import MAX_SERVICE_NAME
from txqb._wire.ring import DATA_PATH, MAGIC_COMMITTED, SEMAPHORE, readPath

_U32 = struct.Struct("<I")
TRANSPORTS = ["shm", "socket"]


def _mine(pid: int) -> List[str]:
    return glob.glob(f"/dev/shm/qb-{pid}-*") + glob.glob(f"/dev/shm/qb-*-{pid}-*")


# Malformed headers: what libqb 2.0.6 does, and what txqb does instead

LIBQB_206 = {
    # case: what the real C server does with it
    "size -1": "stalls",  # neither answers nor closes
    "size above the maximum": "answers",  # trusts hdr.size over the datagram
    "size above the length": "answers",
    "datagram above the maximum": "crashes",  # heap corruption, SIGABRT
}


def _probe(name: str, data: bytes) -> str:
    """Send one malformed request by hand; say how the server reacted."""
    client = RawClient(name)
    try:
        client.connect()
        client.request.send(data)
        if client.closedByPeer(1.0):
            return "closes"
        client.request.settimeout(0.5)
        try:
            client.request.recv(100000)
            return "answers"
        except (TimeoutError, OSError):
            return "stalls"
    finally:
        client.close()


@pytest.mark.parametrize("case", sorted(LIBQB_206))
@pytest_twisted.ensureDeferred
async def test_malformedLibqbLaxTxqbStrict(reactor: Any, cpeers: Peers, serviceName: str, case: str) -> None:
    server = await CServer(reactor, cpeers, serviceName + "c").start()
    try:
        seen = await deferToThread(_probe, serviceName + "c", CASES[case])
        if LIBQB_206[case] == "crashes":
            assert await server.proto.ended == -signal.SIGABRT
            seen = "crashes"
            # What the crashed server had made for the connection stays.
            for left in _mine(server.pid):
                shutil.rmtree(left)
        assert seen == LIBQB_206[case]
    finally:
        if server.proto.exitCode is None:
            await server.stop()
    service = txqb.listen(reactor, serviceName, MatrixHandlers())
    try:
        assert await deferToThread(_probe, serviceName, CASES[case]) == "closes"
        client = await txqb.connect(reactor, serviceName)
        assert (await client.request(0, b"alive")).payload == b"alive"
        await client.disconnect()
    finally:
        await service.stopListening()


# SIGKILL at each phase


async def _phase(reactor: Any, phase: str, request: Callable[[int, bytes], Any], progress: Callable[[], int]) -> None:
    """Bring a connection to C{phase}: connected, mid-request or mid-storm."""
    if phase == "request":
        request(HOLD, b"")
    elif phase == "storm":
        request(1, struct.pack("<II", 30000, 64))
        await _until(reactor, lambda: progress() >= 50, "storm under way")


PHASES = ["connected", "request", "storm"]


async def _killMidPhase(reactor: Any, name: str, server: CServer, phase: str) -> None:
    """Connect a txqb client, reach C{phase}, SIGKILL the server, check the aftermath."""
    client = await txqb.connect(reactor, name)
    # Unread events stop the reading at 50, so the storm stays mid-way.
    client.events(highWater=50)
    outstanding: List[defer.Deferred[Any]] = []
    await _phase(reactor, phase, lambda i, p: outstanding.append(client.request(i, p)), lambda: client.eventsReceived)
    server.kill()
    await server.proto.ended
    await client.whenDisconnected()
    for d in outstanding:
        with pytest.raises(txqb.ConnectionLostError):
            await d
    await client.disconnect()
    # The client removes what the dead server left, its directory too.
    await _until(reactor, lambda: _mine(server.pid) == [], "the dead server's files removed")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_cClientKilled(reactor: Any, cpeers: Peers, serviceName: str, transport: str, phase: str) -> None:
    """A C client SIGKILLed at each phase: its connection and files go, the server serves on."""
    handlers = MatrixHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        script = {
            "connected": ["hang"],
            "request": ["send", str(HOLD), "0", "hang"],
            "storm": ["stall", "30000", "64", "60000"],  # asks, then reads nothing
        }[phase]
        victim = CClient(reactor, cpeers, serviceName, script).start()
        await _until(reactor, lambda: len(service.connections) == 1, "connected")
        (conn,) = service.connections
        if phase == "request":
            await victim.waitFor("HANGING")
        if phase == "storm":
            await _until(reactor, lambda: conn.stats().events > 100, "storm under way")
        victim.kill()
        await victim.finish()
        await conn.whenClosed()
        assert service.connections == []
        assert handlers.names()[-2:] == ["closed", "destroyed"]
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "10")
        assert code == 0, lines
    finally:
        handlers.stopAll()
        await service.stopListening()


@pytest.mark.parametrize("phase", ["handshake"] + PHASES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_cServerKilled(reactor: Any, cpeers: Peers, serviceName: str, transport: str, phase: str) -> None:
    """
    A C server SIGKILLed at each phase: the txqb client notices at once,
    fails what is outstanding and removes every file the server left,
    the directory included (libqb's client leaves that behind).
    """
    server = await CServer(reactor, cpeers, serviceName, "--transport", transport).start()
    try:
        if phase == "handshake":
            os.kill(server.pid, signal.SIGSTOP)
            pending = txqb.connect(reactor, serviceName, timeout=30)
            await task.deferLater(reactor, 0.1, lambda: None)
            assert not pending.called
            server.kill()
            with pytest.raises((txqb.ConnectionLostError, txqb.ServiceNotFoundError)):
                await pending
            return
        await _killMidPhase(reactor, serviceName, server, phase)
    finally:
        server.kill()
        await server.proto.ended


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_txqbServerKilled(reactor: Any, cpeers: Peers, serviceName: str, transport: str, phase: str) -> None:
    """A txqb server process SIGKILLed at each phase, seen by a txqb client."""
    server = await TxqbServer(reactor, cpeers, serviceName, "--transport", transport).start()
    try:
        await _killMidPhase(reactor, serviceName, server, phase)
    finally:
        server.kill()
        await server.proto.ended


# A corrupted event ring, seen by a txqb client


@pytest.mark.parametrize("damage", ["magic", "size"])
@pytest_twisted.ensureDeferred
async def test_corruptEventRingAtClient(reactor: Any, cpeers: Peers, serviceName: str, damage: str) -> None:
    """
    A bad chunk in the event ring a C server writes to: the txqb client
    drops the connection with an error instead of spinning or delivering
    garbage, and the server sees an ordinary disconnect.
    """
    async with await CServer(reactor, cpeers, serviceName, "--transport", "shm").start() as server:
        events: List[txqb.Message] = []
        client = await txqb.connect(reactor, serviceName, eventReceived=events.append)
        try:
            (directory,) = glob.glob(f"/dev/shm/qb-{server.pid}-{os.getpid()}-*")
            header = os.path.join(directory, f"qb-event-{serviceName}-header")
            with open(header, "r+b") as h, mmap.mmap(h.fileno(), 0) as hmap:
                with open(readPath(memoryview(hmap), DATA_PATH), "r+b") as d, mmap.mmap(d.fileno(), 0) as dmap:
                    if damage == "magic":
                        struct.pack_into("<II", dmap, 0, 21, 0xBAD0BAD0)
                    else:
                        struct.pack_into("<II", dmap, 0, 0xBAD0BAD0, MAGIC_COMMITTED)
                sem = SharedSemaphore(hmap, SEMAPHORE)
                sem.post()
                sem.release()
            # Events are read on a doorbell or before a response, as libqb
            # reads them: the echo's response makes the client look.
            with pytest.raises(txqb.ConnectionLostError):
                await client.request(0, b"x").addTimeout(20, reactor)
            await client.whenDisconnected()
            assert events == []
        finally:
            await client.disconnect()
        await server.waitFor("DESTROYED")


# Churn: refusals and killed clients leave nothing behind


def _fdCount() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_thousandRefusedCConnects(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    handlers = MatrixHandlers(refuse=errno.EACCES)
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        fds, shm = _fdCount(), _allShm()
        code, lines = await runClient(reactor, cpeers, serviceName, options=["--cycles", "1000"], timeout=300)
        assert (code, lines) == (0, [f"CYCLES ok=0 fail=1000 errno={errno.EACCES}"])
        await _until(reactor, lambda: not service._pending, "refusals finished")
        assert handlers.names() == ["accept", "destroyed"] * 1000
        assert _fdCount() == fds
        assert shmLeftSince(shm) == set()
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_thousandConnectKillCycles(reactor: Any, serviceName: str) -> None:
    """
    1000 socket-transport clients that vanish without a goodbye (their
    sockets simply close, as when a process is killed); real C clients
    SIGKILLed on both transports: L{test_cClientKillCycles}.
    """
    service = txqb.listen(reactor, serviceName, MatrixHandlers())
    try:
        fds = _fdCount()

        def vanish() -> None:
            for _ in range(1000):
                client = RawClient(serviceName)
                client.connect()
                client.close()

        await deferToThread(vanish)
        await _until(reactor, lambda: not service.connections and not service._pending, "all gone")
        assert service.closedConnections == 1000
        assert _fdCount() == fds
    finally:
        await service.stopListening()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_cClientKillCycles(
    reactor: Any, cpeers: Peers, serviceName: str, transport: str, request: pytest.FixtureRequest
) -> None:
    """Connected C clients SIGKILLed one after another: nothing accumulates."""
    handlers = MatrixHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    n = 5000 if request.config.getoption("--soak") else 1000
    try:
        fds, shm = _fdCount(), _allShm()
        for _ in range(n):
            victim = CClient(reactor, cpeers, serviceName, ["hang"]).start()
            await victim.waitFor("HANGING")
            victim.kill()
            await victim.finish()
        await _until(reactor, lambda: handlers.names().count("destroyed") == n, "all destroyed")
        assert _fdCount() == fds
        assert shmLeftSince(shm) == set()
    finally:
        await service.stopListening()


# Service names: every usable length, and longer ones refused

@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_longServiceNames(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """
    A txqb server serves C clients at every name length up to the
    longest.  libqb 2.0.6's own socket transport fails once its channel
    names pass the 108 bytes of ``sun_path`` (from about 60 characters,
    depending on the pids' digits: they get truncated into one another);
    against such a server a txqb client fails with an error, as libqb's
    client does.
    """
    for length in (len(serviceName) + 1, 40, MAX_SERVICE_NAME):
        name = serviceName + "x" * (length - len(serviceName))
        service = txqb.listen(reactor, name, MatrixHandlers(), transport=transport)
        try:
            code, lines = await runClient(reactor, cpeers, name, "echo", "10")
            assert code == 0, (length, lines)
        finally:
            await service.stopListening()
        async with await CServer(reactor, cpeers, name, "--transport", transport).start() as server:
            if transport == "socket" and length == MAX_SERVICE_NAME:
                code, lines = await runClient(reactor, cpeers, name, "echo", "10")
                assert code == 2 and lines[0].startswith("CONNECT_FAIL"), lines
                with pytest.raises(txqb.QBError):
                    await txqb.connect(reactor, name)
            else:
                client = await txqb.connect(reactor, name)
                assert (await client.request(0, b"x")).payload == b"x"
                await client.disconnect()
            await _until(reactor, lambda: server.lines.count("DESTROYED") >= 1, "connection gone")
    overlong = serviceName + "x" * (MAX_SERVICE_NAME + 1 - len(serviceName))
    with pytest.raises(ValueError):
        txqb.listen(reactor, overlong, MatrixHandlers(), transport=transport)
    with pytest.raises(ValueError):
        await txqb.connect(reactor, overlong)


# A client that stops reading, then resumes


def _cpuSeconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_stalledCClientResumes(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """
    A C client asks for 5000 events and reads nothing for 4 s: the server
    waits without spinning (its CPU time over a second of the stall is a
    small fraction of that second), then every event arrives, in order.
    """
    handlers = MatrixHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        client = CClient(reactor, cpeers, serviceName, ["stall", "5000", "1000", "4000"]).start()
        await _until(reactor, lambda: len(service.connections) == 1, "connected")
        (conn,) = service.connections
        await _until(reactor, lambda: conn.stats().sendRetries > 0, "event channel full")
        sentBefore, cpuBefore = conn.stats().events, _cpuSeconds()
        await task.deferLater(reactor, 1.0, lambda: None)
        cpu, sent = _cpuSeconds() - cpuBefore, conn.stats().events - sentBefore
        # A busy loop would burn the whole second; waiting costs next to nothing.
        assert cpu < 0.5, cpu
        assert sent == 0  # nothing was retried into the full channel meanwhile
        code, lines = await client.finish()
        assert code == 0, lines
        assert "STALL 5000 ok" in lines
    finally:
        await service.stopListening()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_stalledTxqbClientResumes(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """A txqb client that stops consuming events from a C server loses none."""
    async with await CServer(reactor, cpeers, serviceName, "--transport", transport).start():
        client = await txqb.connect(reactor, serviceName)
        try:
            stream = client.events(highWater=100)
            reply = client.request(1, struct.pack("<II", 5000, 1000))
            await task.deferLater(reactor, 1.0, lambda: None)
            assert not reply.called  # the server is held up by the unread events
            seqs = []
            for _ in range(5000):
                seqs.append(_U32.unpack((await stream.__anext__()).payload[:4])[0])
            assert seqs == list(range(5000))
            assert (await reply).payload == _U32.pack(5000)
        finally:
            await client.disconnect()

