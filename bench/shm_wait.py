"""
Round-trip latency and event throughput, txqb against C libqb, in one run.

    .venv/bin/python bench/shm_wait.py [--rounds 5] [--json out.json]

Measures, each pair over QB_IPC_SHM and QB_IPC_SOCKET, servers in their
own processes:

* W1: 64-byte request/response, one outstanding (µs per round trip);
* W3: 64-byte events from server to client (events/s);

for C client -> C server, C client -> txqb server, txqb client -> C server
and txqb client -> txqb server, plus the txqb SHM client with the response
waiter spinning for 20 µs and 100 µs before it blocks.  Every figure is a
median of several rounds and is also given as a ratio to C libqb over SHM
measured in the same run.  Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from peers.build import build  # noqa: E402

ROUND_TRIPS = 5000
EVENTS = 50000

_TXQB_SERVER = """
import sys
from twisted.internet import reactor
import txqb
from txqb.echo import EchoHandlers
txqb.listen(reactor, sys.argv[1], EchoHandlers(), transport=sys.argv[2])
reactor.callWhenRunning(print, "READY", flush=True)
reactor.run()
"""


class Server:
    """A server process (C or txqb) that prints READY when listening."""

    def __init__(self, argv: List[str]) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"server did not start: {line!r}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()


def _cClient(peers: Any, name: str, *commands: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(peers.client), name, *commands], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def cRoundTrip(peers: Any, name: str) -> float:
    """µs per round trip, process start and connect subtracted."""
    full = _cClient(peers, name, "echos", str(ROUND_TRIPS), "64")
    base = _cClient(peers, name, "echos", "1", "64")
    return (full - base) / (ROUND_TRIPS - 1) * 1e6


def cEvents(peers: Any, name: str) -> float:
    full = _cClient(peers, name, "events", str(EVENTS), "64")
    base = _cClient(peers, name, "events", "1", "64")
    return (EVENTS - 1) / (full - base)


def txqbClient(name: str, spin: float = 0.0) -> Dict[str, float]:
    """Run the txqb client in a fresh process (its own reactor)."""
    code = f"""
import json, struct, sys, time
from twisted.internet import defer, task
import txqb
import txqb._reactor.shmtransport as shm
shm.RESPONSE_SPIN = {spin!r}
async def main(reactor):
    client = await txqb.connect(reactor, {name!r})
    payload = bytes(64)
    for _ in range(200):
        await client.request(0, payload)
    started = time.perf_counter()
    for _ in range({ROUND_TRIPS}):
        await client.request(0, payload)
    rtt = (time.perf_counter() - started) / {ROUND_TRIPS} * 1e6
    started = time.perf_counter()
    await client.request(1, struct.pack("<II", {EVENTS}, 64))
    rate = {EVENTS} / (time.perf_counter() - started)
    await client.disconnect()
    print(json.dumps({{"rtt": rtt, "events": rate}}))
task.react(lambda r: defer.ensureDeferred(main(r)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"txqb client failed against {name}: {out.stderr[-3000:]}")
    result: Dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(rounds: int) -> Dict[str, Dict[str, float]]:
    peers = build(Path("/tmp/txqb-bench-peers"))
    rows: Dict[str, Dict[str, List[float]]] = {}

    def add(label: str, rtt: float, events: float) -> None:
        row = rows.setdefault(label, {"rtt": [], "events": []})
        row["rtt"].append(rtt)
        row["events"].append(events)

    for r in range(rounds):
        for transport in ("shm", "socket"):
            name = f"txqbbench{os.getpid()}{transport}{r}"
            c = Server([str(peers.server), name + "c", "--transport", transport])
            t = Server([sys.executable, "-c", _TXQB_SERVER, name + "t", transport])
            try:
                add(f"C -> C {transport}", cRoundTrip(peers, name + "c"), cEvents(peers, name + "c"))
                add(f"C -> txqb {transport}", cRoundTrip(peers, name + "t"), cEvents(peers, name + "t"))
                x = txqbClient(name + "c")
                add(f"txqb -> C {transport}", x["rtt"], x["events"])
                x = txqbClient(name + "t")
                add(f"txqb -> txqb {transport}", x["rtt"], x["events"])
                if transport == "shm":
                    for spin in (20e-6, 100e-6):
                        x = txqbClient(name + "c", spin)
                        add(f"txqb -> C shm, spin {spin * 1e6:.0f} us", x["rtt"], x["events"])
            finally:
                c.stop()
                t.stop()
    return {
        label: {k: statistics.median(v) for k, v in row.items()} for label, row in rows.items()
    }


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = measure(args.rounds)
    ref = results["C -> C shm"]
    print(f"{'pair':32} {'W1 us/rt':>9} {'ratio':>6} {'W3 events/s':>12} {'ratio':>6}")
    for label, row in results.items():
        # Ratios are "as fast as C": C's time over ours, our rate over C's.
        print(
            f"{label:32} {row['rtt']:9.1f} {ref['rtt'] / row['rtt']:6.2f}"
            f" {row['events']:12.0f} {row['events'] / ref['events']:6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
