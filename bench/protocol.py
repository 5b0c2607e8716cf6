"""
The benchmark protocol every server speaks (mirrors bench/c/bench.h), and
what every client reports.

Request ids: 10 ECHO (answered with the payload), 11 SINK (no answer; the
server checks it), 12 STATS (answered with u32 sinks, u32 bad sinks; resets
them), 13 EVENTS ``(u32 count, u32 size)`` (that many events of id 13, then
an answer carrying ``count``).  SINK payloads and events are "u32 sequence
number, then byte ``i`` = ``i & 0xff``", checked with one comparison.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Dict, Tuple

ECHO, SINK, STATS, EVENTS = 10, 11, 12, 13

MAX_PAYLOAD = 1024 * 1024
BIG_MAX = MAX_PAYLOAD + 4096
"""Message size asked for by the clients of W1, W1p, W2, W3."""
SMALL_MAX = 65536
"""Message size asked for by the W4 and W0 clients."""

PATTERN = bytes(i & 0xFF for i in range(256)) * (MAX_PAYLOAD // 256)
U32 = struct.Struct("<I")
PAIR = struct.Struct("<II")
_CLK_TCK = os.sysconf("SC_CLK_TCK")

_tails: Dict[int, bytes] = {}


def tail(size: int) -> bytes:
    """The bytes after the sequence number in a ``size``-byte payload."""
    t = _tails.get(size)
    if t is None:
        t = _tails[size] = PATTERN[4:size]
    return t


def payload(seq: int, size: int) -> bytes:
    """SINK payload or event number ``seq``."""
    return U32.pack(seq & 0xFFFFFFFF) + tail(size)


def payloadOk(data: Any, seq: int) -> bool:
    """
    Whether ``data`` (bytes, or a zero-copy server's view into its ring) is
    payload number ``seq``, intact: one memcmp either way.
    """
    n = len(data)
    if not 4 <= n <= MAX_PAYLOAD or data[:4] != U32.pack(seq & 0xFFFFFFFF):
        return False
    if type(data) is bytes:
        return data.endswith(tail(n))
    # Comparing a memoryview with == goes item by item; bytes.startswith
    # takes any buffer and is one memcmp (the lengths are equal).
    return tail(n).startswith(memoryview(data)[4:])


GATHER_FROM = 16384
"""Payloads from this size up are sent as parts by the senders that can."""


def payloadParts(seq: int, size: int) -> Tuple[bytes, bytes]:
    """
    L{payload} as its two parts, for senders that gather (txqb's, like the
    C programs' ``sendv``): no new megabyte per message.  (Below
    L{GATHER_FROM} joining costs less than gathering.)
    """
    return U32.pack(seq & 0xFFFFFFFF), tail(size)


class SinkCounter:
    """A server's per-connection SINK check."""

    def __init__(self) -> None:
        self.sinks = 0
        self.bad = 0

    def sink(self, data: bytes) -> None:
        if not payloadOk(data, self.sinks):
            self.bad += 1
        self.sinks += 1

    def stats(self) -> bytes:
        out = PAIR.pack(self.sinks, self.bad)
        self.sinks = self.bad = 0
        return out


def procCpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid``, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


Cell = Tuple[str, int, int, int]


def parseCell(text: str) -> Cell:
    """``W1:SIZE:COUNT`` (or ``W4:SIZE:ROUNDS:CLIENTS``) as a tuple."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0].startswith("W"):
        raise ValueError(f"bad cell {text!r}")
    size, count = int(parts[1]), int(parts[2])
    extra = int(parts[3]) if len(parts) == 4 else 0
    if not 4 <= size <= MAX_PAYLOAD or count < 1:
        raise ValueError(f"bad cell {text!r}")
    return parts[0], size, count, extra


class Meter:
    """Wall time, own CPU and the server's CPU over one cell."""

    def __init__(self, serverPid: int) -> None:
        self.serverPid = serverPid
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = procCpu(serverPid)

    def report(self, workload: str, size: int, count: int, ok: bool, **extra: Any) -> None:
        """Print the cell's JSON line (the format bench/c/benchclient.c uses)."""
        line = {
            "workload": workload,
            "size": size,
            "count": count,
            "elapsed": time.perf_counter() - self.t0,
            "client_cpu": time.process_time() - self.c0,
            "server_cpu": procCpu(self.serverPid) - self.s0,
            "ok": bool(ok),
        }
        line.update(extra)
        print(json.dumps(line), flush=True)


