"""Self-tests for the C reference peers in tests/peers/.

The peers (a libqb server driven by qb_loop, a scripted libqb client and an
LD_PRELOAD shim that forces filesystem sockets) are the ground truth the
txqb interoperability tests compare against, so they are first proven
against each other here: plain subprocesses, no Twisted.

Both transports are covered for every scenario.  Each server is started by
:func:`qbServer`, which waits for ``READY`` and always stops it again
(SIGTERM, then checks for exit status 0 and ``BYE``).  After every test no
new ``/dev/shm/qb-*`` entry of ours may remain.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest


def _loadBuildModule() -> ModuleType:
    """Import tests/peers/build.py by path: tests/ is not a package, and
    this works whichever rootdir/import mode pytest runs with."""
    path = pathlib.Path(__file__).resolve().parent / "peers" / "build.py"
    spec = importlib.util.spec_from_file_location("txqb_tests_peers_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_build = _loadBuildModule()

TRANSPORTS = ("socket", "shm")
SHM_DIR = pathlib.Path("/dev/shm")
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 60.0
DEFAULT_BUFSIZE = 65536
RES_HDR = 24
EACCES = 13
ENOTCONN = 107
ECONNREFUSED = 111
EAGAIN = 11
EMSGSIZE = 90
EINVAL = 22

_names = itertools.count()
_ourPids: set[int] = set()  # every peer process started by this module


def _serviceName() -> str:
    return f"txqbpeer{os.getpid()}x{next(_names)}"


@pytest.fixture(scope="session")
def _cpeers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        return _build.build(tmp_path_factory.mktemp("cpeers"))
    except _build.PeersUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"C peers unavailable in CI: {e}")
        pytest.skip(f"C peers unavailable: {e}")


# ---------------------------------------------------------------------------
# /dev/shm bookkeeping


def _shmEntries() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("qb-")}


def _isOurs(entry: str) -> bool:
    """Per-connection entries are named qb-<server pid>-<client pid>-...;
    only those involving a process of ours count, so that unrelated libqb
    programs on the machine cannot break the check."""
    parts = entry.split("-")
    pids = {int(p) for p in parts[1:3] if p.isdigit()}
    return bool(pids & _ourPids)


@pytest.fixture(autouse=True)
def _noShmLeftovers() -> Iterator[None]:
    before = _shmEntries()
    yield
    leftover = sorted(e for e in _shmEntries() - before if _isOurs(e))
    assert not leftover, f"left behind in /dev/shm: {leftover}"


# ---------------------------------------------------------------------------
# process helpers


class _LinePump:
    """Collects a child's stdout lines in a thread, so that waiting for a
    line can time out even if the child hangs."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.what = what
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def details(self) -> str:
        return f"{self.what} output so far {self.lines}"

    def waitLine(self, prefix: str, timeout: float = READY_TIMEOUT_S) -> str:
        """Consume output until a line starting with prefix arrives."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} within {timeout} s; {self.details()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"exited (rc={self.proc.poll()}) before {prefix!r}; "
                    f"{self.details()}"
                )
            if line.startswith(prefix):
                return line

    def close(self) -> None:
        """Wait for EOF (the process must be gone) and close the pipe."""
        self._thread.join(STOP_TIMEOUT_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Server(_LinePump):
    """A running qbserver and the lines it has printed so far."""

    def __init__(
        self, proc: subprocess.Popen[str], name: str, stderrPath: pathlib.Path
    ) -> None:
        super().__init__(proc, "server")
        self.name = name
        self.stderrPath = stderrPath

    @property
    def pid(self) -> int:
        return self.proc.pid

    def details(self) -> str:
        try:
            err = self.stderrPath.read_text(errors="replace")
        except FileNotFoundError:
            err = ""
        return f"{super().details()}, stderr {err!r}"


@contextlib.contextmanager
def qbServer(
    peers: Any,
    tmpPath: pathlib.Path,
    *args: str,
    env: dict[str, str] | None = None,
    expectExit: bool = False,
) -> Iterator[Server]:
    """Run qbserver for the duration of the block.

    On a normal exit from the block the server gets SIGTERM and must exit 0
    after printing BYE; with expectExit it must already have exited 0 on
    its own (the "die" scenario).  If the block raises, the server is
    killed without further checks so the original error stays visible.
    """
    name = _serviceName()
    stderrPath = tmpPath / f"{name}.stderr"
    with open(stderrPath, "w") as errFile:
        proc = subprocess.Popen(
            [str(peers.server), name, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errFile,
            text=True,
            env=env,
        )
    _ourPids.add(proc.pid)
    server = Server(proc, name, stderrPath)
    try:
        ready = server.waitLine("READY")
        assert ready == f"READY {proc.pid}"
        yield server
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.poll() is None and expectExit:
            # The server should have exited by itself; give it a moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.close()
    # Only reached when the block succeeded.
    assert proc.returncode == 0, f"server rc={proc.returncode}; {server.details()}"
    if expectExit:
        assert "BYE" not in server.lines, server.details()
    else:
        assert server.lines[-1:] == ["BYE"], server.details()


@dataclass(frozen=True)
class ClientResult:
    rc: int
    lines: list[str]
    stderr: str
    pid: int

    def line(self, prefix: str) -> str:
        """The single output line starting with prefix."""
        found = [ln for ln in self.lines if ln.startswith(prefix)]
        assert len(found) == 1, f"expected one {prefix!r} line in {self.lines}"
        return found[0]

    def assertOk(self) -> None:
        assert self.rc == 0 and self.lines[-1:] == ["DONE"], (
            f"client rc={self.rc} output {self.lines} stderr {self.stderr!r}"
        )
        assert not any(ln.startswith("FAIL") for ln in self.lines)


def startClient(
    peers: Any,
    name: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(peers.client), name, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _ourPids.add(proc.pid)
    return proc


def finishClient(
    proc: subprocess.Popen[str], timeout: float = CLIENT_TIMEOUT_S
) -> ClientResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client hung; output {out!r} stderr {err!r}")
    return ClientResult(proc.returncode, out.splitlines(), err, proc.pid)


def runClient(
    peers: Any,
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> ClientResult:
    return finishClient(startClient(peers, name, args, env))


@contextlib.contextmanager
def hangingClient(peers: Any, name: str, *commands: str) -> Iterator[_LinePump]:
    """Run qbclient with commands followed by "hang"; yields once it hangs
    (connected and done with the commands) and SIGKILLs it at the end."""
    proc = startClient(peers, name, [*commands, "hang"])
    pump = _LinePump(proc, "client")
    try:
        pump.waitLine("HANGING")
        assert pump.lines[0].startswith("CONNECTED"), pump.details()
        yield pump
    finally:
        proc.kill()
        proc.wait()
        pump.close()
        assert proc.stderr is not None
        proc.stderr.close()


def connectedSize(result: ClientResult) -> int:
    assert result.lines[:1] and result.lines[0].startswith("CONNECTED "), (
        result.lines,
        result.stderr,
    )
    return int(result.lines[0].split()[1])


def assertConnectionLifecycle(server: Server, clientPid: int) -> None:
    """The server saw exactly one accepted connection from clientPid."""
    lifecycle = ("ACCEPT", "CREATED", "CLOSED", "DESTROYED")
    ours = [ln for ln in server.lines if ln.split(" ", 1)[0] in lifecycle]
    assert ours == [
        f"ACCEPT {clientPid} {os.getuid()} {os.getgid()}",
        f"CREATED {clientPid}",
        "CLOSED",
        "DESTROYED",
    ], server.lines


def serverSettle(server: Server) -> None:
    """Wait until the server has torn the last connection down."""
    server.waitLine("DESTROYED")


# ---------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requestResponse(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """echo, a full size sweep, local EMSGSIZE, auth and unknown ids."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        result = runClient(
            _cpeers, server.name,
            "echo", "0", "echo", "1", "echo", "1000",
            "echos", "100", "333",
            "sweep", "997",
            "oversize",
            "auth",
            "invalid", "99", "invalid", "-7",
        )
        result.assertOk()
        bufsize = connectedSize(result)
        assert bufsize == DEFAULT_BUFSIZE
        sweepSizes = len(range(0, bufsize - RES_HDR, 997)) + 1
        assert result.line("SWEEP") == f"SWEEP {sweepSizes} ok"
        assert result.line("OVERSIZE") == f"OVERSIZE {-EMSGSIZE}"
        assert result.line("AUTH") == (
            f"AUTH {server.pid} {os.geteuid()} {os.getegid()}"
        )
        assert result.line("INVALID 99") == f"INVALID 99 {-EINVAL}"
        assert result.line("INVALID -7") == f"INVALID -7 {-EINVAL}"
        serverSettle(server)
    assertConnectionLifecycle(server, result.pid)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_events(_cpeers: Any, tmp_path: pathlib.Path, transport: str) -> None:
    """Many small and some maximum-size events (more than the event queue
    holds, so the server's EAGAIN retry path runs), and events that were
    queued before the response."""
    big = DEFAULT_BUFSIZE - RES_HDR
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        result = runClient(
            _cpeers, server.name,
            "events", "2000", "64",
            "events", "50", str(big),
            "evresp", "10",
            "events", "1", "4",
        )
        result.assertOk()
        assert result.line("EVENTS 2000") == "EVENTS 2000 ok"
        assert result.line("EVENTS 50") == "EVENTS 50 ok"
        assert result.line("EVENTS 1 ") == "EVENTS 1 ok"
        assert result.line("EVRESP") == "EVRESP 10 ok"
        serverSettle(server)
    assert not any(ln.startswith("EVENTFAIL") for ln in server.lines)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rawCommands(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """send/recv/evrecv/waitclose, and the server's oversize event probe."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        result = runClient(
            _cpeers, server.name,
            "send", "7", "0", "recv", "5000",
            "send", "0", "8", "recv", "5000",
            "evrecv", "100",
            "waitclose", "200",
        )
        result.assertOk()
        assert result.line("RECV 24 ") == f"RECV 24 7 {-EMSGSIZE}"
        assert result.line("RECV 32 ") == "RECV 32 0 0"
        # libqb reports an event-receive timeout as -EAGAIN.
        assert result.line("EVRECV") == f"EVRECV {-EAGAIN} -1 -1"
        assert result.line("STILLOPEN") == "STILLOPEN"
        assert result.lines.count("SENT 16") == 1
        assert result.lines.count("SENT 24") == 1
        serverSettle(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_flowControl(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """RATE_OFF (fc=1) turns sends away with -EAGAIN until lifted; OFF_2
    (fc=2) only does so for clients with fc_enable_max 2, otherwise the
    request is sent and simply answered late."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        off = runClient(_cpeers, server.name, "fc", "2", "300")
        off.assertOk()
        assert int(off.line("FC").split("=")[1]) > 0
        server.waitLine("FCON")
        server.waitLine("FCOFF")

        start = time.monotonic()
        off2 = runClient(_cpeers, server.name, "fc", "3", "300")
        off2.assertOk()
        assert off2.line("FC") == "FC eagain=0"
        assert time.monotonic() - start >= 0.3  # answered only after FCOFF
        server.waitLine("FCOFF")

        off2max = runClient(_cpeers, server.name, "--fcmax", "2", "fc", "3", "300")
        off2max.assertOk()
        assert int(off2max.line("FC").split("=")[1]) > 0
        server.waitLine("FCOFF")
        serverSettle(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_serverDisconnects(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """A server-side qb_ipcs_disconnect, repeatedly: the server keeps
    serving afterwards (libqb 2.0.6 would corrupt its heap if qbserver
    disconnected from inside msg_process)."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        kicked = [runClient(_cpeers, server.name, "kick") for _ in range(3)]
        for result in kicked:
            result.assertOk()
            assert result.line("KICKED") == f"KICKED {-ENOTCONN}"
        after = runClient(_cpeers, server.name, "echo", "100")
        after.assertOk()
        serverSettle(server)
    assert server.lines.count("KICK") == 3
    assert server.lines.count("DESTROYED") == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdownWithClient(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """SIGTERM while a client is connected: qb_ipcs_destroy closes the
    connection (and removes its files) before the server says BYE."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        with hangingClient(_cpeers, server.name, "echo", "8"):
            server.proc.send_signal(signal.SIGTERM)
            server.waitLine("BYE")
            server.proc.wait(STOP_TIMEOUT_S)
    assert server.lines[-3:] == ["CLOSED", "DESTROYED", "BYE"], server.lines


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_serverDies(_cpeers: Any, tmp_path: pathlib.Path, transport: str) -> None:
    """The server _exits inside msg_process while the client waits."""
    with qbServer(
        _cpeers, tmp_path, "--transport", transport, expectExit=True
    ) as server:
        before = _shmEntries()
        client = startClient(_cpeers, server.name, ["die"])
        server.waitLine("DYING")
        # Reap the server at once: a zombie still answers kill(pid, 0), and
        # the SHM client's cleanup only happens for a server that is gone.
        server.proc.wait(STOP_TIMEOUT_S)
        result = finishClient(client)
    result.assertOk()
    rc, connected = result.line("DIED").split()[1:]
    assert int(rc) < 0 and connected == "connected=0", result.lines

    leftover = sorted(e for e in _shmEntries() - before if _isOurs(e))
    if transport == "shm":
        # libqb 2.0.6: the client unlinks the dead server's ring files but
        # leaves their (now empty) per-connection directory behind.
        assert len(leftover) == 1, leftover
        assert list((SHM_DIR / leftover[0]).iterdir()) == []
        (SHM_DIR / leftover[0]).rmdir()
    else:
        assert leftover == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_clientKilled(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """A SIGKILLed client: the server tears everything down."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        with hangingClient(_cpeers, server.name, "echo", "8") as client:
            assert client.lines[1] == "ECHO 8 ok"
        serverSettle(server)
    assertConnectionLifecycle(server, client.proc.pid)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refuse(_cpeers: Any, tmp_path: pathlib.Path, transport: str) -> None:
    with qbServer(
        _cpeers, tmp_path, "--transport", transport, "--refuse", str(EACCES)
    ) as server:
        result = runClient(_cpeers, server.name, "echo", "1")
        assert result.rc == 2 and result.lines == [f"CONNECT_FAIL {EACCES}"], (
            result
        )
        serverSettle(server)
    # A refused connection is destroyed without being created or closed.
    assert server.lines == [
        f"READY {server.pid}",
        f"ACCEPT {result.pid} {os.getuid()} {os.getgid()}",
        f"REFUSE {EACCES}",
        "DESTROYED",
        "BYE",
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_enforceBufferSize(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """--enforce is a floor on the negotiated size, which really works."""
    with qbServer(
        _cpeers, tmp_path, "--transport", transport, "--enforce", "200000"
    ) as server:
        result = runClient(
            _cpeers, server.name, "echo", "10", "sweep", "49999",
            "events", "5", "150000",
        )
        result.assertOk()
        assert connectedSize(result) >= 200000
        bufsize = connectedSize(result)
        assert result.line("SWEEP") == (
            f"SWEEP {len(range(0, bufsize - RES_HDR, 49999)) + 1} ok"
        )
        serverSettle(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_clientMaxMsgSize(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """The client's --max is granted as asked, but never below the size of
    the connection response (12328), which a C client clamps up to."""
    with qbServer(_cpeers, tmp_path, "--transport", transport) as server:
        small = runClient(_cpeers, server.name, "--max", "1000", "sweep", "3001")
        small.assertOk()
        assert connectedSize(small) == 12328
        large = runClient(
            _cpeers, server.name, "--max", "300000", "echo", str(300000 - RES_HDR)
        )
        large.assertOk()
        assert connectedSize(large) == 300000
        serverSettle(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_authSet(_cpeers: Any, tmp_path: pathlib.Path, transport: str) -> None:
    """qb_ipcs_connection_auth_set in connection_accept sets the mode of
    the per-connection files."""
    auth = f"{os.getuid()}:{os.getgid()}:0640"
    with qbServer(
        _cpeers, tmp_path, "--transport", transport, "--auth", auth
    ) as server:
        with hangingClient(_cpeers, server.name, "echo", "8") as client:
            dirs = list(SHM_DIR.glob(f"qb-{server.pid}-{client.proc.pid}-*"))
            assert len(dirs) == 1, dirs
            files = list(dirs[0].iterdir())
            # socket: the control file; shm: header + data for 3 rings
            assert len(files) == (1 if transport == "socket" else 6), files
            for f in files:
                st = f.stat()
                assert st.st_mode & 0o7777 == 0o640, (f, oct(st.st_mode))
                assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        serverSettle(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_filesystemSockets(
    _cpeers: Any, tmp_path: pathlib.Path, transport: str
) -> None:
    """With the shim preloaded both peers use /tmp/NAME instead of the
    abstract socket; the server removes it on shutdown."""
    env = dict(os.environ, LD_PRELOAD=str(_cpeers.fsShim))
    with qbServer(
        _cpeers, tmp_path, "--transport", transport, env=env
    ) as server:
        path = pathlib.Path("/tmp") / server.name
        assert path.is_socket()
        listening = pathlib.Path("/proc/net/unix").read_text()
        assert f" {path}\n" in listening
        assert f"@{server.name}" not in listening

        # A client without the shim looks for the abstract name: nobody there.
        plain = runClient(_cpeers, server.name, "echo", "1")
        assert plain.lines == [f"CONNECT_FAIL {ECONNREFUSED}"], plain

        result = runClient(
            _cpeers, server.name, "echo", "100", "events", "100", "64", env=env
        )
        result.assertOk()
        serverSettle(server)
    assert not path.exists()
