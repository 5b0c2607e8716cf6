"""
The ``txqb`` command against C libqb servers (qbserver) and txqb servers
(twistd qbipc): call, listen, ls and stats, and the one-line errors with a
non-zero status for refusal, timeout and a missing service.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import struct
import sys
from typing import Any, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import utils

from cprocs import CServer, _Collect
from peers.build import Peers
from test_twistd import Twistd
from txqb._cli import describe, listServices
from txqb._wire.naming import abstractAddress
from txqb.echo import eventPayload
from txqb._wire.headers import Message

TXQB = os.path.join(os.path.dirname(sys.executable), "txqb")
_EVENTS = struct.Struct("<II")


async def txqb(reactor: Any, *args: str, stdin: Optional[bytes] = None) -> Tuple[bytes, str, int]:
    """Run ``txqb ARGS``; returns stdout (bytes), stderr and the exit status."""
    if stdin is None:
        out, err, code = await utils.getProcessOutputAndValue(TXQB, args, env=dict(os.environ))
        return out, err.decode(), code
    proto = _Collect()
    process = reactor.spawnProcess(proto, TXQB, [TXQB, *args], env=dict(os.environ))
    process.write(stdin)
    process.closeStdin()
    code = await proto.ended
    return "\n".join(proto.lines).encode(), proto.stderr.decode(), code


@pytest.fixture(params=["c-socket", "c-shm", "txqb-socket", "txqb-shm"])
def server(request: pytest.FixtureRequest) -> str:
    """Every verb runs against C libqb's and txqb's servers, on both transports."""
    return str(request.param)


def _start(reactor: Any, cpeers: Peers, name: str, server: str) -> Any:
    kind, transport = server.split("-")
    if kind == "c":
        return CServer(reactor, cpeers, name, "--transport", transport)
    return Twistd(reactor, "--service", f"echo={name}", "--transport", transport)


def test_describe() -> None:
    """Text when printable UTF-8, hex otherwise, and the errno's name."""
    assert describe("response", Message(0, 0, "grüß".encode())) == "response id=0 error=0 size=6 text=grüß"
    assert describe("event", Message(1, 0, b"a\nb")) == "event id=1 error=0 size=3 hex=610a62"
    assert describe("response", Message(7, -22, b"")) == "response id=7 error=-22 (EINVAL) size=0"


@pytest_twisted.ensureDeferred
async def test_call(reactor: Any, cpeers: Peers, serviceName: str, server: str, tmp_path: pathlib.Path) -> None:
    """Payload as text, hex, a file or stdin; output as a line or raw bytes."""
    binary = bytes(range(256))
    (tmp_path / "payload").write_bytes(binary)
    async with _start(reactor, cpeers, serviceName, server):
        out, err, code = await txqb(reactor, "call", serviceName, "--data", "hello world")
        assert (out, err, code) == (b"response id=0 error=0 size=11 text=hello world\n", "", 0)
        out, _, code = await txqb(reactor, "call", serviceName, "--hex", "00ff10")
        assert (out, code) == (b"response id=0 error=0 size=3 hex=00ff10\n", 0)
        out, _, code = await txqb(reactor, "call", serviceName, "--file", str(tmp_path / "payload"), "--raw")
        assert (out, code) == (binary, 0)
        out, _, code = await txqb(reactor, "call", serviceName, "--file", "-", stdin=b"piped")
        assert (out, code) == (b"response id=0 error=0 size=5 text=piped", 0)
        out, _, code = await txqb(reactor, "call", serviceName, "--id", "99", "--max-message-size", "20000")
        assert (out, code) == (b"response id=99 error=-22 (EINVAL) size=0\n", 3)
        out, err, code = await txqb(reactor, "call", serviceName, "--data", "x" * 70000)
        assert code == 1 and out == b""
        assert err == "txqb: request of 70016 bytes exceeds the connection's 65536-byte limit\n"


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_callRefused(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    async with CServer(reactor, cpeers, serviceName, "--transport", transport, "--refuse", "13"):
        out, err, code = await txqb(reactor, "call", serviceName)
    assert (out, code) == (b"", 1)
    assert err == f"txqb: service {serviceName!r} refused the connection: Permission denied\n"


@pytest_twisted.ensureDeferred
async def test_noSuchService(reactor: Any, serviceName: str) -> None:
    for verb in ("call", "listen", "stats"):
        out, err, code = await txqb(reactor, verb, serviceName)
        assert (out, code) == (b"", 1)
        assert err == f"txqb: no libqb service {serviceName!r} is listening\n"


@pytest_twisted.ensureDeferred
async def test_callTimeout(reactor: Any, serviceName: str) -> None:
    """A service that never answers its handshake: a timeout, exit 1."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(abstractAddress(serviceName.encode()))
        sock.listen(1)
        out, err, code = await txqb(reactor, "call", serviceName, "--timeout", "0.2")
    finally:
        sock.close()
    assert (out, code) == (b"", 1)
    assert err == f"txqb: service {serviceName!r} did not answer within the timeout\n"


@pytest_twisted.ensureDeferred
async def test_callFlowControlTimeout(reactor: Any, serviceName: str, tmp_path: pathlib.Path) -> None:
    """A txqb service configured with rate-limit "off": the request times out, exit 1."""
    config = tmp_path / "services.toml"
    config.write_text(f'[services.s]\nhandler = "txqb.echo.EchoHandlers"\nname = "{serviceName}"\nrate-limit = "off"\n')
    async with Twistd(reactor, "--config", str(config)):
        out, err, code = await txqb(reactor, "call", serviceName, "--timeout", "0.2")
    assert (out, code) == (b"", 1)
    assert err == f"txqb: service {serviceName!r} kept flow control on\n"


@pytest_twisted.ensureDeferred
async def test_listen(reactor: Any, cpeers: Peers, serviceName: str, server: str) -> None:
    """One request, then its events; --count ends it."""
    async with _start(reactor, cpeers, serviceName, server):
        out, err, code = await txqb(
            reactor, "listen", serviceName, "--id", "1", "--hex", _EVENTS.pack(3, 8).hex(), "--count", "3"
        )
    assert (err, code) == ("", 0)
    assert out.decode().splitlines() == [
        "response id=1 error=0 size=4 hex=03000000",
        *(f"event id=1 error=0 size=8 hex={eventPayload(i, 8).hex()}" for i in range(3)),
    ]


async def _listening(reactor: Any, name: str) -> Tuple[Any, _Collect]:
    proto = _Collect()
    process = reactor.spawnProcess(proto, TXQB, [TXQB, "listen", name], env=dict(os.environ))
    return process, proto


@pytest.mark.parametrize("signal", ["INT", "TERM"])
@pytest_twisted.ensureDeferred
async def test_listenInterrupted(reactor: Any, cpeers: Peers, serviceName: str, signal: str) -> None:
    """Ctrl-C (or SIGTERM) ends listen with status 0, no traceback, nothing left."""
    async with CServer(reactor, cpeers, serviceName, "--transport", "shm") as server:
        process, proto = await _listening(reactor, serviceName)
        await server.waitFor("CREATED")
        process.signalProcess(signal)
        assert await proto.ended == 0
        await server.waitFor("DESTROYED")
    assert proto.stderr == b""
    assert proto.lines == []


@pytest_twisted.ensureDeferred
async def test_listenServerGoes(reactor: Any, serviceName: str) -> None:
    """When the server stops, listen says so on stderr and exits 1."""
    async with Twistd(reactor, "--service", f"echo={serviceName}", "--transport", "shm") as server:
        process, proto = await _listening(reactor, serviceName)
        await server.waitLog(f"{serviceName}: connection from pid {process.pid}")
    assert await proto.ended == 1
    assert proto.stderr.decode() == f"txqb: service {serviceName!r} closed the connection\n"


def _row(output: str, name: str) -> List[str]:
    (row,) = [line.split() for line in output.splitlines() if line.split()[:1] == [name]]
    return row


@pytest_twisted.ensureDeferred
async def test_ls(reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """
    C servers on abstract and filesystem sockets and a twistd service, each
    with its pid, uid and command; only the txqb one publishes statistics.
    """
    fsName, cName, txName = serviceName + "f", serviceName + "c", serviceName + "t"
    async with CServer(reactor, cpeers, cName) as cServer, CServer(
        reactor, cpeers, fsName, env={"LD_PRELOAD": str(cpeers.fsShim)}
    ) as fsServer, Twistd(reactor, "--service", f"echo={txName}") as twistd:
        out, err, code = await txqb(reactor, "ls")
        assert (err, code) == ("", 0)
        text = out.decode()
        assert text.splitlines()[0].split() == ["NAME", "PID", "UID", "COMMAND", "STATS", "ADDRESS"]
        uid = str(os.getuid())
        assert _row(text, cName) == [cName, str(cServer.pid), uid, "qbserver", "-", "abstract"]
        assert _row(text, fsName) == [fsName, str(fsServer.pid), uid, "qbserver", "-", f"/tmp/{fsName}"]
        assert _row(text, txName)[:2] == [txName, str(twistd.pid)]
        assert _row(text, txName)[4:] == ["yes", "abstract"]
        out, _, code = await txqb(reactor, "ls", "--json")
        listed = {entry["name"]: entry for entry in json.loads(out)}
        assert listed[txName]["pid"] == twistd.pid and listed[txName]["stats"] is True
        assert [s.name for s in listServices() if s.name.startswith(serviceName)] == sorted([fsName, cName, txName])
    assert [s for s in listServices() if s.name.startswith(serviceName)] == []


@pytest_twisted.ensureDeferred
async def test_stats(reactor: Any, cpeers: Peers, serviceName: str, tmp_path: pathlib.Path) -> None:
    """A txqb service's connections and counters; a C server publishes none."""
    config = tmp_path / "services.toml"
    config.write_text(f'[services.s]\nhandler = "txqb.echo.EchoHandlers"\nname = "{serviceName}"\nrate-limit = "slow"\n')
    async with Twistd(reactor, "--config", str(config)) as server:
        out, _, code = await txqb(reactor, "call", serviceName, "--data", "one")
        assert code == 0
        process, proto = await _listening(reactor, serviceName)
        await server.waitLog(f"connection from pid {process.pid}")
        out, err, code = await txqb(reactor, "stats", serviceName)
        assert (err, code) == ("", 0)
        lines = out.decode().splitlines()
        assert lines[0] == (
            f"service {serviceName} (pid {server.pid}, socket transport, rate slow):"
            " 1 connected, 1 closed"
        )
        assert lines[1].startswith(f"  pid {process.pid} uid {os.getuid()} gid {os.getgid()}: maxMessageSize=65536")
        assert "requests=0" in lines[1]
        out, _, code = await txqb(reactor, "stats", serviceName, "--json")
        body = json.loads(out)
        assert body["closedConnections"] == 1
        assert [c["pid"] for c in body["connections"]] == [process.pid]
        process.signalProcess("INT")
        assert await proto.ended == 0
    async with CServer(reactor, cpeers, serviceName):
        out, err, code = await txqb(reactor, "stats", serviceName)
    assert (out, code) == (b"", 1)
    assert err == f"txqb: service {serviceName!r} publishes no statistics (only services run by twistd qbipc do)\n"


@pytest_twisted.ensureDeferred
async def test_usage(reactor: Any) -> None:
    out, err, code = await txqb(reactor, "call")
    assert code == 2 and "usage: txqb call" in err
    out, err, code = await txqb(reactor, "call", "x", "--hex", "zz")
    assert (code, err) == (1, "txqb: --hex 'zz' is not hexadecimal\n")
    out, err, code = await txqb(reactor, "call", "a/b")
    assert (code, err) == (2, "txqb: service name 'a/b' contains NUL or '/'\n")
