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
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Iterator, Set

import pytest
import pytest_twisted
from twisted.internet import task

sys.path.insert(0, os.path.dirname(__file__))

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

from peers.build import Peers, PeersUnavailable, build  # noqa: E402

_SETTLE_STEPS = 100
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


_spawned: Set[int] = set()
"""Pids of every process this run started (see _recordChildren)."""


def _recordChildren() -> None:
    # Another test run on the same machine makes /dev/shm entries too;
    # knowing this run's processes tells them apart (a libqb connection
    # directory is named qb-<server pid>-<client pid>-...).
    original = subprocess.Popen.__init__

    def recordingInit(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _spawned.add(self.pid)

    subprocess.Popen.__init__ = recordingInit  # type: ignore[method-assign]
    reactor = _reactor()
    spawn = reactor.spawnProcess

    def recordingSpawn(*args: Any, **kwargs: Any) -> Any:
        process = spawn(*args, **kwargs)
        _spawned.add(process.pid)
        return process

    reactor.spawnProcess = recordingSpawn


def _ours(name: str) -> bool:
    # Names made by this run carry its pid (see the serviceName fixture);
    # another test run on the same machine makes txqbtest<its pid> names,
    # which are not this run's leaks.
    if "txqbtest" in name:
        return f"txqbtest{os.getpid()}n" in name
    parts = name.split("-")
    if name.startswith("qb-") and len(parts) > 2 and parts[1].isdigit() and parts[2].isdigit():
        pids = {int(parts[1]), int(parts[2])}
        return bool(pids & (_spawned | {os.getpid()}))
    return True


def _descendsFromUs(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _foreign(name: str) -> bool:
    # qb-<server pid>-<client pid>-<fd>-XXXXXX: a connection between live
    # processes of which neither is this run or its child is another
    # run's, however its service is named.  Entries of dead processes
    # count as ours: they are leaks either way.
    try:
        pids = [int(p) for p in name.split("-")[1:3]]
    except (ValueError, IndexError):
        return False
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
    return bool(alive) and not any(_descendsFromUs(p) for p in alive)


def _shmEntries() -> Set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("qb-")}


def _tmpSockets() -> Set[str]:
    return {n for n in os.listdir("/tmp") if n.startswith("txqbtest")}


def _madeByUs(entries: Set[str]) -> Set[str]:
    # Only entries that appeared during the test are judged, so whatever
    # was there before (another run's, or debris of killed processes
    # whose pids have since been reused) can never count.
    return {n for n in entries if _ours(n) and not _foreign(n)}


def _state(reactor: Any) -> tuple[Set[Any], Set[Any], int]:
    return set(reactor.getReaders()), set(reactor.getWriters()), len(reactor.getDelayedCalls())


@pytest.fixture(scope="session")
def _reactorStarted() -> None:
    # The reactor adds its own wakers and signal pipes when it first runs;
    # let that happen before any test takes its baseline.
    _recordChildren()
    pytest_twisted.blockon(task.deferLater(_reactor(), 0, lambda: None))


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest, _reactorStarted: None) -> Iterator[None]:
    """Fail a test that leaves anything behind (see the module docstring)."""
    reactor = _reactor()
    readers, writers, _ = _state(reactor)
    fds, shm, socks = _fds(), _shmEntries(), _tmpSockets()
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
            and not _madeByUs(_shmEntries() - shm)
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
    shmLeft = _madeByUs(_shmEntries() - shm)
    if shmLeft:
        problems.append(f"/dev/shm entries left: {sorted(shmLeft)}")
    socksLeft = _madeByUs(_tmpSockets() - socks)
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
