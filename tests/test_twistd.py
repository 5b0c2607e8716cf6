"""
``twistd qbipc``: the plugin is found, built-in and configured services run
under twistd and serve C libqb clients, the configuration's policy is
applied, bad configurations are one-line usage errors, and SIGTERM leaves
nothing behind.
"""

from __future__ import annotations

import grp
import os
import pathlib
import stat
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import task

from cprocs import CServer, _Collect, runClient
from peers.build import Peers

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples" / "services"


class Twistd:
    """A ``twistd -n qbipc ...`` child process; use C{async with}."""

    def __init__(
        self,
        reactor: Any,
        *args: str,
        services: int = 1,
        env: Optional[Dict[str, str]] = None,
        executable: str = TWISTD,
        argv0: Optional[List[str]] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.services = services
        self.proto = _Collect()
        self.executable = executable
        self.argv = [*(argv0 or [executable]), "-n", "--pidfile=", "--logfile=-", "qbipc", *args]
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.pid = 0

    @property
    def lines(self) -> List[str]:
        return self.proto.lines

    async def start(self) -> Twistd:
        process = self.reactor.spawnProcess(
            self.proto, self.executable, self.argv, env=self.env, path=self.cwd
        )
        self.process = process
        self.pid = process.pid
        while sum("listening at" in line for line in self.proto.lines) < self.services:
            assert self.proto.exitCode is None, self.proto.lines
            await task.deferLater(self.reactor, 0.05, lambda: None)
        return self

    async def waitLog(self, text: str) -> str:
        """Wait until a log line contains C{text}; return it."""
        while True:
            for line in self.proto.lines:
                if text in line:
                    return line
            assert self.proto.exitCode is None, self.proto.lines
            await task.deferLater(self.reactor, 0.05, lambda: None)

    stop = CServer.stop  # SIGTERM, wait; returns the exit status

    async def __aenter__(self) -> Twistd:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.proto.exitCode is None:
            await self.stop()


def leftovers(pid: int) -> List[str]:
    """Shared-memory directories a server process made and left."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"qb-{pid}-")]


def test_pluginListed() -> None:
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "qbipc" in out.stdout


def _usageError(*args: str) -> str:
    out = subprocess.run(
        [TWISTD, "-n", "qbipc", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "name at least one --service"),
        (["--service", "nope"], "unknown service 'nope'"),
        (["--service", "echo", "--transport", "carrier-pigeon"], "unknown transport"),
        (["--service", "echo=" + "x" * 200], "service name is 200 bytes"),
        (["--service", "echo=a", "--service", "echo=a"], "service name 'a' is used twice"),
    ],
)
def test_usageErrors(args: list[str], message: str) -> None:
    assert message in _usageError(*args)


_ECHO = 'handler = "txqb.echo.EchoHandlers"\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "cannot read: No such file or directory"),
        ("[services.a\n", "not valid TOML"),
        ("[services.a]\n" + _ECHO + "colour = 1\n", "services.a: unknown key 'colour'"),
        ("[services.a]\n" + _ECHO + "max-message-size = 'big'\n", "max-message-size must be an integer"),
        ("[services.a]\nhandler = 'txqb.echo.Nope'\n", "txqb.echo has no attribute 'Nope'"),
        ("[services.a]\n" + _ECHO + "allowed-uids = ['txqbnosuchuser']\n", "unknown user 'txqbnosuchuser'"),
        ("[services.a]\n" + _ECHO + "file-group = 'txqbnosuchgroup'\n", "unknown group 'txqbnosuchgroup'"),
        ("[services.a]\n" + _ECHO + "file-mode = 'rw-rw----'\n", "is not an octal mode"),
        ("[services.a]\nhandler = 'builtins.dict'\n", "which does not provide txqb.interfaces.IServiceHandlers"),
        ("[services.a]\nhandler = 'txqb.echo.EchoHandlers'\nhandler-args = {colour = 1}\n", "handler txqb.echo.EchoHandlers failed: TypeError"),
    ],
)
def test_badConfig(tmp_path: pathlib.Path, text: Optional[str], message: str) -> None:
    """Each bad configuration is one usage line naming the file."""
    path = tmp_path / "services.toml"
    if text is not None:
        path.write_text(text)
    output = _usageError("--config", str(path))
    (line,) = [line for line in output.splitlines() if message in line]
    assert str(path) in line


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_echoUnderTwistd(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """A C libqb client uses the echo service that twistd runs; SIGTERM is clean."""
    server = Twistd(reactor, "--service", f"echo={serviceName}", "--transport", transport)
    async with server:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "echo", "1000", "events", "500", "100", "invalid", "7"
        )
        assert code == 0, lines
        assert lines[1:] == ["ECHO 1000 ok", "EVENTS 500 ok", "INVALID 7 -22", "DONE"]
    assert server.proto.exitCode == 0
    assert any(f"{serviceName}: listening" in line for line in server.lines)
    assert leftovers(server.pid) == []


@pytest_twisted.ensureDeferred
async def test_documentedConfig(reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """
    The operator guide's example configuration, two services on the two
    transports (renamed with --service KEY=NAME), driven by C libqb clients;
    each connection is logged with its pid, uid and gid.
    """
    echoName, counterName = serviceName + "e", serviceName + "c"
    server = Twistd(
        reactor,
        "--config", str(EXAMPLE / "services.toml"),
        "--service", f"echo={echoName}",
        "--service", f"counter={counterName}",
        services=2,
        env={"PYTHONPATH": str(EXAMPLE)},
    )
    async with server:
        assert any(f"{echoName}: listening" in line and "shm transport" in line for line in server.lines)
        assert any(f"{counterName}: listening" in line and "socket transport" in line for line in server.lines)
        code, lines = await runClient(reactor, cpeers, echoName, "echo", "100000", "events", "50", "64")
        assert code == 0, lines
        assert lines[1:] == ["ECHO 100000 ok", "EVENTS 50 ok", "DONE"]
        code, lines = await runClient(reactor, cpeers, counterName, "send", "0", "4", "recv", "5000", "invalid", "7")
        if os.getuid() == 0:
            # The counter allows uid 0: it answers with 24 + 4 bytes.
            assert code == 0, lines
            assert lines[1:] == ["SENT 20", "RECV 28 0 0", "INVALID 7 -22", "DONE"]
            await server.waitLog(f"{counterName}: connection from pid")
        else:
            assert lines == ["CONNECT_FAIL 13"]
    assert server.proto.exitCode == 0
    line = [line for line in server.lines if f"{echoName}: connection from pid" in line][0]
    assert f"uid {os.getuid()} gid {os.getgid()}" in line
    assert leftovers(server.pid) == []


def _config(tmp_path: pathlib.Path, name: str, transport: str, extra: str) -> str:
    path = tmp_path / "services.toml"
    path.write_text(f'[services.s]\nhandler = "txqb.echo.EchoHandlers"\nname = "{name}"\ntransport = "{transport}"\n{extra}')
    return str(path)


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_configRefuses(reactor: Any, cpeers: Peers, serviceName: str, tmp_path: pathlib.Path, transport: str) -> None:
    """A client outside allowed-uids/allowed-gids is refused with EACCES, and it is logged."""
    notMe = 4242 if os.getuid() != 4242 else 4243
    config = _config(tmp_path, serviceName, transport, f"allowed-uids = [{notMe}]\nallowed-gids = [{notMe}]\n")
    async with Twistd(reactor, "--config", config) as server:
        code, lines = await runClient(reactor, cpeers, serviceName, "echo", "10")
        assert lines == ["CONNECT_FAIL 13"]
        assert code == 2
        line = await server.waitLog("refused pid")
    assert f"uid {os.getuid()} gid {os.getgid()}: not in allowed-uids/allowed-gids" in line
    assert leftovers(server.pid) == []


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_configFileOwnership(
    reactor: Any, cpeers: Peers, serviceName: str, tmp_path: pathlib.Path, transport: str
) -> None:
    """file-group and file-mode give each connection's shared files their owner and mode."""
    group = grp.getgrgid(os.getgid()).gr_name
    config = _config(tmp_path, serviceName, transport, f'file-group = "{group}"\nfile-mode = "0640"\n')
    async with Twistd(reactor, "--config", config) as server:
        client = _Collect()
        argv = [str(cpeers.client), serviceName, "sleep", "30000"]
        process = reactor.spawnProcess(client, argv[0], argv, env=dict(os.environ))
        try:
            await client.waitFor("CONNECTED", reactor)
            (directory,) = leftovers(server.pid)
            files = os.listdir(os.path.join("/dev/shm", directory))
            assert files
            modes = {stat.S_IMODE(os.stat(os.path.join("/dev/shm", directory, f)).st_mode) for f in files}
            groups = {os.stat(os.path.join("/dev/shm", directory, f)).st_gid for f in files}
        finally:
            process.signalProcess("KILL")
            await client.ended
    assert modes == {0o640}
    assert groups == {os.getgid()}


@pytest_twisted.ensureDeferred
async def test_sigtermWithClients(reactor: Any, cpeers: Peers, serviceName: str, tmp_path: pathlib.Path) -> None:
    """SIGTERM with clients connected to a configured service disconnects them and removes everything."""
    config = _config(tmp_path, serviceName, "shm", "")
    server = Twistd(reactor, "--config", config)
    async with server:
        client = _Collect()
        argv = [str(cpeers.client), serviceName, "waitclose", "30000"]
        reactor.spawnProcess(client, argv[0], argv, env=dict(os.environ))
        await client.waitFor("CONNECTED", reactor)
        assert len(leftovers(server.pid)) == 1
        assert await server.stop() == 0
        assert await client.ended == 0, client.lines
    assert leftovers(server.pid) == []
    assert not any(f"@{serviceName}" in line for line in open("/proc/net/unix"))
