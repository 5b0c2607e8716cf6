"""
Running the C libqb peers from tests without blocking the reactor.

A C server (``qbserver``) is a child process whose stdout lines the test
can wait for; a C client run (``qbclient``) is one process whose output and
exit status come back in a L{Deferred}.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence, Set

from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from peers.build import Peers


SPAWNED: Set[int] = set()
"""
Pids of every process a test started (conftest records each spawnProcess
and Popen child here): their /dev/shm entries are the run's own.
"""


class _Collect(protocol.ProcessProtocol):
    """Collects stdout lines and stderr; fires waiters on matching lines."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.stderr = b""
        self._partial = b""
        self._waiters: List[tuple[str, Deferred[str]]] = []
        self.ended: Deferred[int] = Deferred()
        self.exitCode: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for waiter in list(self._waiters):
                if line.startswith(waiter[0]):
                    self._waiters.remove(waiter)
                    waiter[1].callback(line)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def waitFor(self, prefix: str, reactor: Any, timeout: float = 20.0) -> Deferred[str]:
        for line in self.lines:
            if line.startswith(prefix):
                d: Deferred[str] = Deferred()
                d.callback(line)
                return d
        d = Deferred()
        self._waiters.append((prefix, d))
        d.addTimeout(timeout, reactor)
        return d

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated):
            self.exitCode = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        else:
            self.exitCode = 0
        for _, d in self._waiters:
            if not d.called:
                d.errback(RuntimeError(f"process ended before the line: {self.lines}"))
        self._waiters = []
        self.ended.callback(self.exitCode)


def _env(extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME")}
    env.update(extra or {})
    return env


class CServer:
    """A running ``qbserver``; use C{async with} or start/stop."""

    def __init__(
        self,
        reactor: Any,
        peers: Peers,
        name: str,
        *args: str,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.reactor = reactor
        self.argv = [str(peers.server), name, *args]
        self.env = _env(env)
        self.proto = _Collect()
        self.pid = 0

    async def start(self) -> CServer:
        self.process = self.reactor.spawnProcess(
            self.proto, self.argv[0], self.argv, env=self.env
        )
        line = await self.proto.waitFor("READY", self.reactor)
        self.pid = int(line.split()[1])
        return self

    @property
    def lines(self) -> List[str]:
        return self.proto.lines

    def waitFor(self, prefix: str, timeout: float = 20.0) -> Deferred[str]:
        return self.proto.waitFor(prefix, self.reactor, timeout)

    async def stop(self) -> int:
        """SIGTERM the server, wait for it; returns its exit status."""
        if self.proto.exitCode is None:
            try:
                self.process.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
        code: int = await self.proto.ended
        return code

    def kill(self) -> None:
        if self.proto.exitCode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    async def __aenter__(self) -> CServer:
        if not self.pid:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proto.exitCode is None:
            await self.stop()
        else:
            await self.proto.ended


class TxqbServer(CServer):
    """
    A txqb server in its own process (tests/peers/txqbpeer.py), for the
    scenarios in which the server must die: same protocol lines as
    ``qbserver`` (READY, DYING, BYE).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "txqbpeer.py")
        self.argv = [sys.executable, script, *self.argv[1:]]
        # The child must import this checkout's txqb, as the tests do.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = root


class CClient:
    """One ``qbclient`` run."""

    def __init__(
        self,
        reactor: Any,
        peers: Peers,
        name: str,
        commands: Sequence[str],
        options: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.reactor = reactor
        self.argv = [str(peers.client), name, *options, *commands]
        self.env = _env(env)
        self.proto = _Collect()

    def start(self) -> CClient:
        self.process = self.reactor.spawnProcess(
            self.proto, self.argv[0], self.argv, env=self.env
        )
        return self

    def waitFor(self, prefix: str, timeout: float = 20.0) -> Deferred[str]:
        return self.proto.waitFor(prefix, self.reactor, timeout)

    def kill(self) -> None:
        if self.proto.exitCode is None:
            try:
                self.process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    async def finish(self, timeout: float = 60.0) -> tuple[int, List[str]]:
        ended = self.proto.ended
        ended.addTimeout(timeout, self.reactor, onTimeoutCancel=self._killed)
        code: int = await ended
        return code, self.proto.lines

    def _killed(self, result: Any, timeout: float) -> Any:
        self.kill()
        raise AssertionError(f"C client ran over {timeout} s: {self.proto.lines}")


async def runClient(
    reactor: Any,
    peers: Peers,
    name: str,
    *commands: str,
    options: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    timeout: float = 60.0,
) -> tuple[int, List[str]]:
    """Run ``qbclient NAME OPTIONS COMMANDS...`` to the end."""
    return await CClient(reactor, peers, name, commands, options, env).start().finish(timeout)
