"""
``twistd qbipc``: the plugin is found, the echo service runs under twistd
and serves C libqb clients, and SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from cprocs import _Collect, runClient
from peers.build import Peers

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def test_pluginListed() -> None:
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "qbipc" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "name at least one --service"),
        (["--service", "nope"], "unknown service 'nope'"),
        (["--service", "echo", "--transport", "carrier-pigeon"], "unknown transport"),
        (["--service", "echo=" + "x" * 200], "service name is 200 bytes"),
    ],
)
def test_usageErrors(args: list[str], message: str) -> None:
    out = subprocess.run(
        [TWISTD, "-n", "qbipc", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest_twisted.ensureDeferred
async def test_echoUnderTwistd(reactor: Any, cpeers: Peers, serviceName: str, transport: str) -> None:
    """A C libqb client uses the echo service that twistd runs; SIGTERM is clean."""
    proto = _Collect()
    argv = [TWISTD, "-n", "--pidfile=", "--logfile=-", "qbipc", "--service", f"echo={serviceName}", "--transport", transport]
    process = reactor.spawnProcess(proto, TWISTD, argv, env=dict(os.environ))
    try:
        await _waitLog(proto, reactor)
        code, lines = await runClient(
            reactor, cpeers, serviceName, "echo", "1000", "events", "500", "100", "invalid", "7"
        )
        assert code == 0, lines
        assert lines[1:] == ["ECHO 1000 ok", "EVENTS 500 ok", "INVALID 7 -22", "DONE"]
    finally:
        process.signalProcess("TERM")
        assert await proto.ended == 0
    assert any(f"{serviceName}: listening" in line for line in proto.lines)


async def _waitLog(proto: _Collect, reactor: Any) -> None:
    while not any("listening at" in line for line in proto.lines):
        assert proto.exitCode is None, proto.lines
        await task.deferLater(reactor, 0.05, lambda: None)
