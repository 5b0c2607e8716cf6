"""
The benchmark driver: every pair, transport, workload and payload size,
several rounds, medians, ratios to C libqb over SHM from the same run.

See ``python -m bench --help`` and docs/performance.rst.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SIZES = (64, 1024, 65536, 1024 * 1024)
WORKLOADS = ("W0", "W1", "W1p", "W2", "W3", "W4")
W4_SIZE = 64

# Messages per cell in a full run (each roughly half a second for txqb).
COUNTS: Dict[str, Dict[int, int]] = {
    "W1": {64: 10000, 1024: 10000, 65536: 2000, 1048576: 150},
    "W1p": {64: 20000, 1024: 20000, 65536: 2000, 1048576: 150},
    "W2": {64: 50000, 1024: 50000, 65536: 3000, 1048576: 200},
    "W3": {64: 50000, 1024: 50000, 65536: 3000, 1048576: 200},
}
W4_ROUNDS = 100
W0_SHOTS = 10
SMOKE_COUNTS = {64: 40, 1024: 40, 65536: 10, 1048576: 3}


@dataclass(frozen=True)
class Pair:
    """Who serves, who connects, over which transport."""

    label: str
    server: str  # "c", "txqb", "amp", "int32", "zmq"
    client: str
    transport: str  # "shm", "socket" (libqb), "unix" (stream), "ipc" (zmq)

    @property
    def key(self) -> str:
        return f"{self.label} [{self.transport}]"

    @property
    def libqb(self) -> bool:
        return self.transport in ("shm", "socket")


def pairs() -> List[Pair]:
    out = []
    for transport in ("shm", "socket"):
        out += [
            Pair("C -> C", "c", "c", transport),
            Pair("txqb -> txqb", "txqb", "txqb", transport),
            Pair("txqb -> C", "c", "txqb", transport),
            Pair("C -> txqb", "txqb", "c", transport),
        ]
    out += [
        Pair("AMP", "amp", "amp", "unix"),
        Pair("Int32StringReceiver", "int32", "int32", "unix"),
        Pair("pyzmq", "zmq", "zmq", "ipc"),
    ]
    return out


REFERENCE = Pair("C -> C", "c", "c", "shm").key


class BenchError(Exception):
    """A benchmark cell failed its checks, or a process failed."""


def buildC(cache: Optional[Path] = None) -> Tuple[Path, Path]:
    """Compile bench/c/ with gcc -lqb into a cache directory keyed by the sources."""
    sources = sorted((HERE / "c").glob("*.[ch]"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    base = cache or Path(os.environ.get("XDG_CACHE_HOME", tempfile.gettempdir()))
    out = base / f"txqb-bench-{os.getuid()}-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    programs = []
    for name in ("benchserver", "benchclient"):
        binary = out / name
        if not binary.exists():
            tmp = out / f".{name}.{os.getpid()}"
            result = subprocess.run(
                ["gcc", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(HERE / "c" / f"{name}.c"),
                 "-lqb"],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise BenchError(f"gcc failed for {name}:\n{result.stderr}")
            tmp.rename(binary)
        programs.append(binary)
    return programs[0], programs[1]


def _python() -> List[str]:
    return [sys.executable, "-m", "bench.peer"]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


class Server:
    """A server process that prints ``READY <pid>`` once listening."""

    def __init__(self, argv: List[str]) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_env(),
                                        cwd=str(ROOT))
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY"):
            self.process.kill()
            self.process.wait()
            raise BenchError(f"server {argv} did not start: {line!r}")
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def cellsFor(pair: Pair, smoke: bool, clients: int) -> List[str]:
    """The ``W:SIZE:COUNT`` arguments a pair's client runs (W0 is separate)."""
    cells = []
    for workload in ("W1", "W1p", "W2", "W3"):
        if workload == "W1p" and pair.client == "c":
            continue  # qb_ipcc_sendv_recv has one request outstanding at most
        for size in SIZES:
            count = SMOKE_COUNTS[size] if smoke else COUNTS[workload][size]
            cells.append(f"{workload}:{size}:{count}")
    cells.append(f"W4:{W4_SIZE}:{2 if smoke else W4_ROUNDS}:{clients}")
    return cells


def _expectedCount(cell: str) -> Tuple[str, int, int]:
    parts = cell.split(":")
    count = int(parts[2]) * (int(parts[3]) if parts[0] == "W4" else 1)
    return parts[0], int(parts[1]), count


def checkResults(cells: List[str], lines: List[Dict[str, Any]]) -> None:
    """Every cell reported, each with its full count and its checks passed."""
    if len(lines) != len(cells):
        raise BenchError(f"expected {len(cells)} results, got {len(lines)}: {lines}")
    for cell, line in zip(cells, lines):
        workload, size, count = _expectedCount(cell)
        if (line.get("workload"), line.get("size"), line.get("count")) != (workload, size, count):
            raise BenchError(f"cell {cell} reported {line}")
        if line.get("ok") is not True:
            raise BenchError(f"cell {cell} failed its integrity checks: {line}")
        if not line.get("elapsed", 0) > 0:
            raise BenchError(f"cell {cell} reported no time: {line}")


def _addresses(pair: Pair, prefix: str, tag: str) -> str:
    if pair.libqb:
        return f"{prefix}{tag}"
    return f"/tmp/{prefix}{tag}.sock"


def _serverArgv(pair: Pair, address: str, cServer: Path) -> List[str]:
    if pair.server == "c":
        return [str(cServer), address, pair.transport]
    return _python() + ["server", pair.server, address, pair.transport]


def _windowBytes(pair: Pair) -> int:
    # Against a C server, stay within what it can take without dropping a
    # response (its response ring or socket buffer); txqb servers never drop.
    if pair.server == "c":
        from bench.protocol import BIG_MAX

        return BIG_MAX // 2 if pair.transport == "shm" else 128 * 1024
    return 1 << 30


def runClient(pair: Pair, address: str, serverPid: int, cells: List[str],
              cClient: Path) -> List[Dict[str, Any]]:
    if pair.client == "c":
        argv = [str(cClient), address, str(serverPid)] + cells
    else:
        argv = _python() + ["client", pair.client, address, str(serverPid),
                            str(_windowBytes(pair))] + cells
    result = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=str(ROOT),
                            timeout=900)
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    if result.returncode != 0:
        raise BenchError(f"{pair.key} client failed ({result.returncode}): {lines}\n"
                         f"{result.stderr[-4000:]}")
    checkResults(cells, lines)
    return lines


def oneshot(pair: Pair, address: str, server: Server, shots: int, cClient: Path,
            runner: Optional[str]) -> Dict[str, Any]:
    """W0: start a client process, connect, one round trip, exit; per shot."""
    from bench.protocol import procCpu

    if pair.client == "c":
        argv = [str(cClient), address, str(server.pid), "W0"]
    else:
        from bench.peer import defaultOneshotRunner

        runner = runner if pair.client == "txqb" and runner else defaultOneshotRunner(pair.client)
        argv = _python() + ["oneshot", pair.client, address, runner]
    walls, cpus = [], []
    env = _env()
    for _ in range(shots):
        s0 = procCpu(server.pid)
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise BenchError(f"{pair.key} one-shot client failed ({child.returncode})")
        walls.append(wall)
        cpus.append(usage.ru_utime + usage.ru_stime + procCpu(server.pid) - s0)
    return {"workload": "W0", "size": 64, "count": shots, "elapsed": sum(walls),
            "wall_median": statistics.median(walls), "cpu_median": statistics.median(cpus),
            "client_cpu": 0.0, "server_cpu": 0.0, "ok": True, "runner": runner}


def runPair(pair: Pair, prefix: str, tag: str, smoke: bool, clients: int, shots: int,
            programs: Tuple[Path, Path], runner: Optional[str]) -> List[Dict[str, Any]]:
    address = _addresses(pair, prefix, tag)
    server = Server(_serverArgv(pair, address, programs[0]))
    try:
        cells = cellsFor(pair, smoke, clients)
        lines = runClient(pair, address, server.pid, cells, programs[1])
        lines.append(oneshot(pair, address, server, shots, programs[1], runner))
    finally:
        server.stop()
        if not pair.libqb and os.path.exists(address):
            os.unlink(address)
    return lines


def metrics(line: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """msgs/s, MB/s (payload one way), µs per round trip, CPU µs per message."""
    workload, size, count, t = line["workload"], line["size"], line["count"], line["elapsed"]
    if workload == "W0":
        return {"msgs_s": None, "mb_s": None, "us_rt": line["wall_median"] * 1e6,
                "cpu_us": line["cpu_median"] * 1e6}
    rate = count / t
    us = None
    if workload in ("W1", "W1p"):
        us = t / count * 1e6
    elif workload == "W4":
        us = t / (count / max(1, line.get("clients", 100))) * 1e6
    return {"msgs_s": rate, "mb_s": rate * size / 1e6, "us_rt": us,
            "cpu_us": (line["client_cpu"] + line["server_cpu"]) / count * 1e6}


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def _spread(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [v for v in values if v is not None]
    if len(vs) < 2 or not statistics.median(vs):
        return None
    return (max(vs) - min(vs)) / statistics.median(vs)


def measure(rounds: int = 3, smoke: bool = False, clients: int = 100, shots: int = W0_SHOTS,
            prefix: str = "", only: Optional[List[str]] = None,
            runner: Optional[str] = None, log: Any = None) -> Dict[str, Any]:
    """Run everything; the results as a JSON-able dict (see docs/performance.rst)."""
    loadBefore = os.getloadavg()
    programs = buildC()
    prefix = prefix or f"txqbbench{os.getpid()}"
    raw: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    selected = [p for p in pairs() if not only or any(o in p.key for o in only)]
    failures: List[str] = []
    for r in range(rounds):
        for i, pair in enumerate(selected):
            started = time.perf_counter()
            try:
                lines = runPair(pair, prefix, f"r{r}p{i}", smoke, clients, shots, programs, runner)
            except BenchError as e:
                # A smoke run must fail; a long run keeps the other pairs.
                if smoke:
                    raise
                failures.append(f"round {r + 1} {pair.key}: {e}")
                if log:
                    print(f"round {r + 1}/{rounds} {pair.key}: FAILED {e}", file=log, flush=True)
                continue
            for line in lines:
                if line["workload"] == "W4":
                    line["clients"] = clients
                raw.setdefault((pair.key, line["workload"], line["size"]), []).append(line)
            if log:
                print(f"round {r + 1}/{rounds} {pair.key}: {time.perf_counter() - started:.1f} s",
                      file=log, flush=True)
    cells: List[Dict[str, Any]] = []
    for (key, workload, size), lines in raw.items():
        ms = [metrics(x) for x in lines]
        cell: Dict[str, Any] = {"pair": key, "workload": workload, "size": size,
                                "rounds": len(lines)}
        for name in ("msgs_s", "mb_s", "us_rt", "cpu_us"):
            cell[name] = _median(m[name] for m in ms)
            cell[name + "_spread"] = _spread(m[name] for m in ms)
        cells.append(cell)
    index = {(c["pair"], c["workload"], c["size"]): c for c in cells}
    for c in cells:
        ref = index.get((REFERENCE, "W1" if c["workload"] == "W1p" else c["workload"], c["size"]))
        c["speed_ratio"] = c["cpu_ratio"] = None
        if ref:
            if c["msgs_s"] and ref["msgs_s"]:
                c["speed_ratio"] = c["msgs_s"] / ref["msgs_s"]
            elif c["us_rt"] and ref["us_rt"]:
                c["speed_ratio"] = ref["us_rt"] / c["us_rt"]
            if c["cpu_us"] and ref["cpu_us"]:
                c["cpu_ratio"] = ref["cpu_us"] / c["cpu_us"]
    return {
        "reference": REFERENCE,
        "rounds": rounds,
        "smoke": smoke,
        "clients": clients,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_before": loadBefore},
        "cells": cells,
        "failures": failures,
    }


def _fmt(v: Optional[float], digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _size(n: int) -> str:
    return f"{n // 1048576} MiB" if n >= 1048576 else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def table(results: Dict[str, Any]) -> str:
    """The results as an RST simple table, grouped by workload and size."""
    order = {p.key: i for i, p in enumerate(pairs())}
    rows = [("cell", "pair", "msgs/s", "MB/s", "us/rt", "CPU us/msg", "speed", "CPU")]
    cells = sorted(results["cells"], key=lambda c: (WORKLOADS.index(c["workload"]), c["size"],
                                                     order.get(c["pair"], 99)))
    for c in cells:
        rows.append((
            f"{c['workload']} {_size(c['size'])}", c["pair"], _fmt(c["msgs_s"]),
            _fmt(c["mb_s"], 1), _fmt(c["us_rt"], 1), _fmt(c["cpu_us"], 2),
            _fmt(c["speed_ratio"], 2), _fmt(c["cpu_ratio"], 2),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    out = [rule, "  ".join(h.ljust(w) for h, w in zip(rows[0], widths)), rule]
    previous = None
    for r in rows[1:]:
        first = r[0] if r[0] != previous else ""
        previous = r[0]
        out.append("  ".join(v.ljust(w) for v, w in zip((first,) + r[1:], widths)).rstrip())
    out.append(rule)
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="txqb against C libqb and Python alternatives; ratios to C libqb SHM.",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="a few messages per cell: checks that every cell works")
    parser.add_argument("--clients", type=int, default=100, help="W4 concurrent clients")
    parser.add_argument("--shots", type=int, default=W0_SHOTS, help="W0 processes per round")
    parser.add_argument("--only", action="append", help="pairs whose label contains this")
    parser.add_argument("--prefix", default="", help="service-name prefix")
    parser.add_argument("--oneshot-runner", choices=("twisted", "blocking"),
                        help="W0 txqb client (default: the fastest available)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rst", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    try:
        results = measure(args.rounds, args.smoke, args.clients, args.shots, args.prefix,
                          args.only, args.oneshot_runner, sys.stderr)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    results["machine"]["load_after"] = os.getloadavg()
    text = table(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.rst:
        args.rst.write_text(text + "\n")
    for failure in results["failures"]:
        print(f"bench: {failure}", file=sys.stderr)
    return 1 if results["failures"] else 0
