"""
Fixtures for txqb's tests.

* C{reactor}: the reactor pytest-twisted installed (``--reactor`` picks
  it: default, asyncio, ...; with ``--reactor=default``, the environment
  variable ``TXQB_TEST_REACTOR=poll`` or ``select`` picks Twisted's poll or
  select reactor instead of epoll).
* An autouse cleanliness check, in the spirit of trial's dirty-reactor
  error and libqb's ``resources.test``: after every test no delayed call,
  reader or writer beyond the baseline remains, no file descriptor leaked,
  and no ``/dev/shm/qb-*`` or ``/tmp`` socket the test made is left.  A
  failure names what leaked.
* C{cpeers}: our C libqb peers, built with gcc against the system's libqb.
  Under ``CI=true`` a missing libqb fails the run instead of skipping.
* A leak gate for the whole run, like libqb's ``resources.test``: once all
  tests are done, no ``/dev/shm`` entry or socket named for this run
  (``txqbtest<pid>n...``) may remain, no child process of the run may be
  left, and the number of open fds must be back to what it was when the
  first test started.  A leak is named and fails the run (exit status 1);
  the gate then removes what it found, so one bad run does not poison the
  next.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Set

import pytest
import pytest_twisted
from twisted.internet import task

sys.path.insert(0, os.path.dirname(__file__))

from peers.build import Peers, PeersUnavailable, build  # noqa: E402

_SETTLE_STEPS = 100
_REACTORS = {"poll": "PollReactor", "select": "SelectReactor"}
_chosen = os.environ.get("TXQB_TEST_REACTOR", "")
if _chosen:
    if _chosen not in _REACTORS:
        raise RuntimeError(f"TXQB_TEST_REACTOR={_chosen!r}: use one of {sorted(_REACTORS)}")

    def _installChosen() -> None:
        import importlib

        module = importlib.import_module(f"twisted.internet.{_chosen}reactor")
        pytest_twisted._install_reactor(
            reactor_installer=module.install, reactor_type=getattr(module, _REACTORS[_chosen])
        )

    # pytest-twisted installs the reactor in its pytest_configure, which
    # runs after this module is imported.
    pytest_twisted.reactor_installers["default"] = _installChosen

_CONNECTION_DIR = re.compile(r"qb-(\d+)-(\d+)-\d+-")
_GATE_SETTLE_S = 5.0
_sessionBaseline: Dict[str, Set[int]] = {}
_SETTLE_DELAY = 0.01


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def reactor() -> Any:
    """The running reactor (pytest-twisted drives it in a greenlet)."""
    return _reactor()


def _fds() -> Set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _fdTarget(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _ours(name: str) -> bool:
    # Names made by this run carry its pid (see the serviceName fixture);
    # another test run on the same machine makes txqbtest<its pid> names,
    # which are not this run's leaks.  Names without the prefix are ours
    # to account for too.
    # Per-connection directories (qb-SERVERPID-CLIENTPID-FD-XXXXXX) carry
    # no service name: they are ours when one end is this process or a
    # peer it started.
    ends = _CONNECTION_DIR.match(name)
    if ends:
        from cprocs import SPAWNED

        return bool({int(ends[1]), int(ends[2])} & (SPAWNED | {os.getpid()}))
    return "txqbtest" not in name or f"txqbtest{os.getpid()}n" in name


def _allShm() -> Set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("qb-")}


def shmLeftSince(before: Set[str]) -> Set[str]:
    """
    This run's ``/dev/shm/qb-*`` entries that are not in C{before} (a
    snapshot of L{_allShm}): stale entries of dead runs never count, even
    when a new peer's pid happens to match one.
    """
    return {n for n in _allShm() - before if _ours(n)}


def _tmpSockets() -> Set[str]:
    return {n for n in os.listdir("/tmp") if n.startswith("txqbtest") and _ours(n)}


def _state(reactor: Any) -> tuple[Set[Any], Set[Any], int]:
    return set(reactor.getReaders()), set(reactor.getWriters()), len(reactor.getDelayedCalls())


def _recordChildren() -> None:
    # Every process a test starts, by whatever means, is one of this run's
    # peers (see _ours): record Popen's and spawnProcess's children too.
    from cprocs import SPAWNED

    original = subprocess.Popen.__init__

    def recordingInit(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        SPAWNED.add(self.pid)

    subprocess.Popen.__init__ = recordingInit  # type: ignore[method-assign]
    reactor = _reactor()
    spawn = reactor.spawnProcess

    def recordingSpawn(*args: Any, **kwargs: Any) -> Any:
        process = spawn(*args, **kwargs)
        SPAWNED.add(process.pid)
        return process

    reactor.spawnProcess = recordingSpawn


@pytest.fixture(scope="session")
def _reactorStarted() -> None:
    # The reactor adds its own wakers and signal pipes when it first runs;
    # let that happen before any test takes its baseline.
    _recordChildren()
    pytest_twisted.blockon(task.deferLater(_reactor(), 0, lambda: None))
    _sessionBaseline["fds"] = _fds()


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest, _reactorStarted: None) -> Iterator[None]:
    """Fail a test that leaves anything behind (see the module docstring)."""
    reactor = _reactor()
    readers, writers, _ = _state(reactor)
    fds, shm, socks = _fds(), _allShm(), _tmpSockets()
    yield
    problems = []
    for _ in range(_SETTLE_STEPS):
        nowReaders, nowWriters, calls = _state(reactor)
        leakedFds = _fds() - fds
        if (
            nowReaders <= readers
            and nowWriters <= writers
            and calls == 0
            and not leakedFds
            and not shmLeftSince(shm)
        ):
            break
        # Give in-flight teardown (process reaping, closing callbacks) a
        # chance to finish before judging.
        pytest_twisted.blockon(task.deferLater(reactor, _SETTLE_DELAY, lambda: None))
    nowReaders, nowWriters, calls = _state(reactor)
    if nowReaders - readers:
        problems.append(f"readers left: {nowReaders - readers}")
    if nowWriters - writers:
        problems.append(f"writers left: {nowWriters - writers}")
    if calls:
        pending = reactor.getDelayedCalls()
        problems.append(f"delayed calls left: {pending}")
        for call in pending:
            call.cancel()
    leaked = _fds() - fds
    if leaked:
        problems.append(
            "fds leaked: " + ", ".join(f"{fd}->{_fdTarget(fd)}" for fd in sorted(leaked))
        )
    shmLeft = shmLeftSince(shm)
    if shmLeft:
        problems.append(f"/dev/shm entries left: {sorted(shmLeft)}")
    socksLeft = _tmpSockets() - socks
    if socksLeft:
        problems.append(f"/tmp sockets left: {sorted(socksLeft)}")
    if problems:
        pytest.fail("test left state behind: " + "; ".join(problems))


@pytest.fixture(scope="session")
def cpeers(tmp_path_factory: pytest.TempPathFactory) -> Peers:
    """The C libqb peers (see tests/peers/)."""
    try:
        return build(tmp_path_factory.mktemp("cpeers"))
    except PeersUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"C libqb peers unavailable under CI: {e}")
        pytest.skip(f"C libqb peers unavailable: {e}")


@pytest.fixture(params=["socket", "shm"])
def transport(request: pytest.FixtureRequest) -> str:
    """A test that takes it runs over both transports."""
    return str(request.param)


_counter = [0]


@pytest.fixture
def serviceName() -> str:
    """A service name no other test (or test run) uses."""
    _counter[0] += 1
    return f"txqbtest{os.getpid()}n{_counter[0]}"


def pytest_report_header(config: pytest.Config) -> str:
    """Say which reactor runs the tests."""
    return f"txqb reactor: {type(_reactor()).__module__}.{type(_reactor()).__name__}"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak``: run the churn and kill-cycle tests at long, slow counts."""
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="long counts for the stress cases (50 000 connection cycles, ...)",
    )


# The session-wide leak gate (see the module docstring).


def _runTag() -> str:
    return f"txqbtest{os.getpid()}n"


def _children() -> Dict[int, str]:
    """Child processes of this run (zombies included), with their command lines."""
    me = os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            # Field 4 is the parent pid; the command (field 2) may hold spaces.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = cmd or stat.split()[1]
    return found


def _boundSockets(tag: str) -> List[str]:
    """Sockets still bound under this run's names, abstract ones included."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    return sorted({parts[-1] for parts in (line.split() for line in lines) if len(parts) >= 8 and tag in parts[-1]})


def sessionLeaks() -> List[str]:
    """What this run left behind, one description per leak."""
    tag = _runTag()
    problems = []
    shm = sorted(n for n in os.listdir("/dev/shm") if tag in n)
    if shm:
        problems.append(f"/dev/shm entries left: {shm}")
    files = sorted(n for n in os.listdir("/tmp") if n.startswith(tag))
    if files:
        problems.append(f"/tmp sockets left: {files}")
    bound = _boundSockets(tag)
    if bound:
        problems.append(f"sockets still bound: {bound}")
    children = _children()
    if children:
        problems.append(
            "child processes left: " + ", ".join(f"{pid} ({cmd})" for pid, cmd in sorted(children.items()))
        )
    baseline = _sessionBaseline.get("fds")
    if baseline is not None:
        extra = _fds() - baseline
        if extra:
            problems.append(
                f"fds open: {len(baseline) + len(extra)} against {len(baseline)} at the start: "
                + ", ".join(f"{fd}->{_fdTarget(fd)}" for fd in sorted(extra))
            )
    return problems


def _removeLeaks() -> None:
    tag = _runTag()
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            pass
    for name in os.listdir("/dev/shm"):
        if tag in name:
            path = os.path.join("/dev/shm", name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    for name in os.listdir("/tmp"):
        if name.startswith(tag):
            os.unlink(os.path.join("/tmp", name))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The leak gate: fail the run if anything outlived the tests."""
    deadline = time.monotonic() + _GATE_SETTLE_S
    problems = sessionLeaks()
    while problems and time.monotonic() < deadline:
        # Children may still be exiting, sockets closing.
        time.sleep(0.05)
        problems = sessionLeaks()
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for problem in problems:
        message = f"leak gate: {problem}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:
            print(message, file=sys.stderr)
    _removeLeaks()
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
