"""
The benchmark's Python processes::

    python -m bench.peer server FLAVOR ADDRESS TRANSPORT
    python -m bench.peer client FLAVOR ADDRESS SERVER_PID WINDOW_BYTES CELL...
    python -m bench.peer oneshot FLAVOR ADDRESS

FLAVOR is txqb, amp, int32 or zmq.  A server prints ``READY <pid>``; a
client prints one JSON line per cell (as bench/c/benchclient.c does);
``oneshot`` connects, makes one 64-byte round trip and exits 0 if the
echo came back intact (W0; the driver times the whole process).

W0's txqb runner is pluggable: ``ONESHOT_RUNNERS`` maps a name to a
function; ``twisted`` uses txqb's Twisted client, ``blocking`` uses
``txqb.blocking`` when that module exists (``connect(name)`` returning an
object with ``request(id, payload)`` and ``close()``).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Callable, Dict, List


def _twistedOneshot(flavor: str, address: str) -> bool:
    from twisted.internet import defer, task

    from bench import twistedpeers
    from bench.protocol import ECHO, SMALL_MAX, payload

    result: List[bool] = []

    async def main(reactor: Any) -> None:
        conn = await twistedpeers.FLAVORS[flavor].open(address, SMALL_MAX, SMALL_MAX)
        p = payload(0, 64)
        result.append(conn.payloadOf(await conn.request(ECHO, p)) == p)
        await defer.maybeDeferred(conn.close)

    try:
        task.react(lambda r: defer.ensureDeferred(main(r)))
    except SystemExit as e:
        if e.code:
            return False
    return result == [True]


def _blockingOneshot(flavor: str, address: str) -> bool:
    import txqb.blocking  # type: ignore[import-not-found]

    from bench.protocol import ECHO, payload

    p = payload(0, 64)
    client = txqb.blocking.connect(address)
    try:
        reply = client.request(ECHO, p)
        return getattr(reply, "payload", reply) == p
    finally:
        client.close()


def _zmqOneshot(flavor: str, address: str) -> bool:
    from bench import zmqpeer

    return zmqpeer.oneshot(address)


ONESHOT_RUNNERS: Dict[str, Callable[[str, str], bool]] = {
    "twisted": _twistedOneshot,
    "blocking": _blockingOneshot,
    "zmq": _zmqOneshot,
}


def defaultOneshotRunner(flavor: str) -> str:
    """The W0 runner for a flavor: the fastest client available."""
    if flavor == "zmq":
        return "zmq"
    if flavor == "txqb" and importlib.util.find_spec("txqb.blocking") is not None:
        return "blocking"
    return "twisted"


def main(argv: List[str]) -> int:
    mode, flavor, address = argv[0], argv[1], argv[2]
    if mode == "server":
        if flavor == "zmq":
            from bench import zmqpeer

            zmqpeer.serve(address)
        else:
            from bench import twistedpeers

            twistedpeers.serve(flavor, address, argv[3])
        return 0
    if mode == "oneshot":
        runner = argv[3] if len(argv) > 3 else defaultOneshotRunner(flavor)
        return 0 if ONESHOT_RUNNERS[runner](flavor, address) else 1
    serverPid, windowBytes, cells = int(argv[3]), int(argv[4]), argv[5:]
    if flavor == "zmq":
        from bench import zmqpeer

        zmqpeer.runCells(address, serverPid, cells)
        return 0
    from twisted.internet import defer, task

    from bench import twistedpeers

    task.react(lambda r: defer.ensureDeferred(
        twistedpeers.runCells(flavor, address, serverPid, cells, windowBytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
