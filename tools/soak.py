"""
A soak run: many clients, C libqb and txqb, over SHM and sockets, for N
minutes of mixed requests, event bursts, disconnects and SIGKILLs against
txqb servers (one process per transport).  Not part of CI; see
docs/matrix.rst.  Run it as ``tools/soak --minutes 10 --clients 100``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TRANSPORTS = ("shm", "socket")


def serve(name: str, transport: str) -> int:
    """Server mode: the echo service, counting, until SIGTERM; stats as JSON."""
    from twisted.internet import reactor

    import txqb
    from txqb.echo import EchoHandlers

    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    stats: Dict[str, Any] = {"requests": 0, "events": 0, "connections": 0, "loggedErrors": 0}
    samples: List[str] = []
    stats["errorSamples"] = samples

    def observe(event: Dict[str, Any]) -> None:
        # Count what the server logs as errors.  Beginning logging also
        # ends Twisted's start-up buffer, which otherwise keeps the first
        # 65 536 log events in memory and would show as the server's RSS.
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            stats["loggedErrors"] += 1
            if len(samples) < 5:
                samples.append(formatEvent(event))

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)  # type: ignore[list-item]

    class Counting(EchoHandlers):
        def connectionCreated(self, connection: Any) -> None:
            stats["connections"] += 1

        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            stats["requests"] += 1
            if msgId == 1 and len(payload) == 8:
                stats["events"] += struct.unpack("<II", payload)[0]
            return super().messageReceived(connection, msgId, payload)

    service = txqb.listen(reactor, name, Counting(), transport=transport)

    def stop() -> None:
        stats["fds"] = len(os.listdir("/proc/self/fd"))
        stats["peakRssKiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        service.stopListening().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(stop))  # type: ignore[attr-defined]
    print(f"READY {os.getpid()}", flush=True)
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    print("STATS " + json.dumps(stats), flush=True)
    return 0


class Soak:
    """The driver: clients, counters and the final report."""

    def __init__(self, reactor: Any, peers: Any, minutes: float, clients: int) -> None:
        self.reactor = reactor
        self.peers = peers
        self.deadline = reactor.seconds() + minutes * 60
        self.clients = clients
        self.tag = f"txqbsoak{os.getpid()}n"
        self.names = {t: f"{self.tag}{t}" for t in TRANSPORTS}
        self.servers: Dict[str, Any] = {}
        self.count = {"requests": 0, "events": 0, "errors": 0, "kills": 0, "cRuns": 0, "txqbSessions": 0}
        self.errors: List[str] = []
        self.peakFds = {t: 0 for t in TRANSPORTS}
        self.random = random.Random(7)

    def error(self, what: str) -> None:
        self.count["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(what)

    async def startServers(self) -> None:
        from cprocs import CServer

        for transport, name in self.names.items():
            server = CServer(self.reactor, self.peers, name)
            server.argv = [sys.executable, os.path.abspath(__file__), "--serve", name, transport]
            server.env["PYTHONPATH"] = ROOT
            await server.start()
            # Counted from outside, as at the end (listing its own fds
            # inside the server would hold one more open).
            server.baseFds = len(os.listdir(f"/proc/{server.pid}/fd"))
            self.servers[transport] = server

    def sampleFds(self) -> None:
        for transport, server in self.servers.items():
            try:
                self.peakFds[transport] = max(self.peakFds[transport], len(os.listdir(f"/proc/{server.pid}/fd")))
            except OSError:
                pass

    async def txqbLoop(self, transport: str) -> None:
        import txqb
        from twisted.internet import task

        while self.reactor.seconds() < self.deadline:
            try:
                client = await txqb.connect(self.reactor, self.names[transport])
                self.count["txqbSessions"] += 1
                for _ in range(self.random.randint(1, 50)):
                    if self.random.random() < 0.2:
                        n = self.random.randint(1, 200)
                        reply = await client.request(1, struct.pack("<II", n, self.random.choice((4, 64, 4096))))
                        assert reply.error == 0, reply
                        self.count["events"] += n
                    else:
                        payload = os.urandom(self.random.randint(0, 8000))
                        assert (await client.request(0, payload)).payload == payload
                    self.count["requests"] += 1
                await client.disconnect()
            except Exception as e:  # any failure is a soak error
                self.error(f"txqb {transport}: {e!r}")
                await task.deferLater(self.reactor, 0.1, lambda: None)

    async def cLoop(self, transport: str) -> None:
        from cprocs import CClient
        from twisted.internet import task

        while self.reactor.seconds() < self.deadline:
            n, size = self.random.randint(1, 300), self.random.choice((4, 64, 4096))
            echos = self.random.randint(1, 100)
            kill = self.random.random() < 0.15
            script = ["echos", str(echos), "100", "events", str(n), str(size)] + (["hang"] if kill else [])
            client = CClient(self.reactor, self.peers, self.names[transport], script).start()
            self.count["cRuns"] += 1
            if kill:
                try:
                    await client.waitFor("HANGING", timeout=60)
                except Exception as e:
                    self.error(f"C {transport}: {e!r} {client.proto.lines}")
                await task.deferLater(self.reactor, self.random.random() * 0.05, lambda: None)
                client.kill()
                self.count["kills"] += 1
                await client.proto.ended
            else:
                code, lines = await client.finish(timeout=120)
                if code != 0:
                    self.error(f"C {transport}: exit {code} {lines[-2:]}")
                    continue
            self.count["requests"] += echos + 1
            self.count["events"] += n

    async def run(self) -> Dict[str, Any]:
        from twisted.internet import defer, task

        await self.startServers()
        sampler = task.LoopingCall(self.sampleFds)
        sampler.clock = self.reactor
        sampler.start(0.5)
        loops = []
        for i in range(self.clients):
            transport = TRANSPORTS[i % 2]
            loop = self.txqbLoop if (i // 2) % 2 == 0 else self.cLoop
            loops.append(defer.ensureDeferred(loop(transport)))
        await defer.DeferredList(loops)
        sampler.stop()
        await task.deferLater(self.reactor, 1.0, lambda: None)
        report: Dict[str, Any] = {"client": dict(self.count), "errors": self.errors, "servers": {}}
        leaks: List[str] = []
        for transport, server in self.servers.items():
            idleFds = len(os.listdir(f"/proc/{server.pid}/fd"))
            code = await server.stop()
            (stats,) = [json.loads(line[6:]) for line in server.lines if line.startswith("STATS ")]
            stats.update(exit=code, baseFds=server.baseFds, idleFds=idleFds, peakFds=self.peakFds[transport])
            report["servers"][transport] = stats
            if idleFds != server.baseFds:
                leaks.append(f"{transport} server fds {idleFds} after the run, {server.baseFds} before")
        leftovers = [n for n in os.listdir("/dev/shm") if self.tag in n]
        leftovers += [n for n in os.listdir("/tmp") if n.startswith(self.tag)]
        if leftovers:
            leaks.append(f"left behind: {sorted(leftovers)}")
        report["leaks"] = leaks
        return report


def main(argv: List[str]) -> int:
    """Parse the command line; serve or drive."""
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args(argv)

    import pathlib

    from twisted.internet import defer, reactor, task

    from peers.build import build

    buildDir = tempfile.mkdtemp(prefix="txqbsoak")
    result: Dict[str, Any] = {}
    try:
        peers = build(pathlib.Path(buildDir))
        soak = Soak(reactor, peers, args.minutes, args.clients)

        async def go(_: Any) -> None:
            result.update(await soak.run())

        done = defer.ensureDeferred(go(None))
        done.addErrback(lambda f: result.update(crash=f.getTraceback()))
        done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(buildDir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = not result.get("crash") and not result.get("leaks") and not result.get("errors")
    ok = ok and all(s["exit"] == 0 for s in result.get("servers", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
