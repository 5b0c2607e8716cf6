"""
pyzmq over ``ipc://``: a ROUTER server and DEALER clients in plain blocking
style (pyzmq's natural use), speaking bench/protocol.py as two-frame
messages ``[kind, payload]``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import zmq

from bench.protocol import (
    ECHO,
    EVENTS,
    PAIR,
    SINK,
    STATS,
    U32,
    Meter,
    SinkCounter,
    parseCell,
    payload,
    payloadOk,
)

WINDOW = 32
_K = {ECHO: b"E", SINK: b"S", STATS: b"T", EVENTS: b"V"}
_EVENT = b"v"


def _socket(context: Any, kind: int) -> Any:
    s = context.socket(kind)
    s.setsockopt(zmq.LINGER, 1000)
    return s


def serve(address: str) -> None:
    """Serve until SIGTERM."""
    context = zmq.Context()
    router = _socket(context, zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if os.path.exists(address):
        os.unlink(address)
    router.bind("ipc://" + address)
    counters: Dict[bytes, SinkCounter] = {}
    print("READY", os.getpid(), flush=True)
    recv, send = router.recv_multipart, router.send_multipart
    while True:
        ident, kind, data = recv()
        if kind == b"E":
            send([ident, kind, data])
        elif kind == b"S":
            counters.setdefault(ident, SinkCounter()).sink(data)
        elif kind == b"T":
            send([ident, kind, counters.setdefault(ident, SinkCounter()).stats()])
        elif kind == b"V":
            count, size = PAIR.unpack(data)
            for seq in range(count):
                send([ident, _EVENT, payload(seq, size)])
            send([ident, kind, U32.pack(count)])


def _request(s: Any, kind: bytes, data: bytes) -> bytes:
    s.send_multipart([kind, data])
    got_kind, reply = s.recv_multipart()
    return reply  # type: ignore[no-any-return]


def w1(s: Any, size: int, count: int) -> bool:
    payloads = [payload(0, size), payload(1, size)]
    send, recv = s.send_multipart, s.recv_multipart
    ok = True
    for i in range(count):
        p = payloads[i & 1]
        send([b"E", p])
        ok = recv()[1] == p and ok
    return ok


def w1p(s: Any, size: int, count: int) -> bool:
    window = min(WINDOW, count)
    payloads = [payload(i, size) for i in range(window)]
    send, recv = s.send_multipart, s.recv_multipart
    for i in range(window):
        send([b"E", payloads[i]])
    bad = 0
    for i in range(count):
        if recv()[1] != payloads[i % window]:
            bad += 1
        if i + window < count:
            send([b"E", payloads[(i + window) % window]])
    return bad == 0


def w2(s: Any, size: int, count: int) -> bool:
    send = s.send_multipart
    for i in range(count):
        send([b"S", payload(i, size)])
    return PAIR.unpack(_request(s, b"T", b"")) == (count, 0)


def w3(s: Any, size: int, count: int) -> bool:
    s.send_multipart([b"V", PAIR.pack(count, size)])
    recv = s.recv_multipart
    bad = 0
    for seq in range(count):
        kind, data = recv()
        if kind != _EVENT or len(data) != size or not payloadOk(data, seq):
            bad += 1
    kind, data = recv()
    return bad == 0 and data == U32.pack(count)


def w4(context: Any, address: str, size: int, rounds: int, clients: int, serverPid: int) -> None:
    socks = [_connect(context, address) for _ in range(clients)]
    p = payload(0, size)
    meter = Meter(serverPid)
    ok = True
    for _ in range(rounds):
        for s in socks:
            s.send_multipart([b"E", p])
        for s in socks:
            ok = s.recv_multipart()[1] == p and ok
    meter.report("W4", size, rounds * clients, ok)
    for s in socks:
        s.close()


def _connect(context: Any, address: str) -> Any:
    s = _socket(context, zmq.DEALER)
    s.connect("ipc://" + address)
    return s


def runCells(address: str, serverPid: int, cells: List[str]) -> None:
    context = zmq.Context()
    s = None
    for text in cells:
        workload, size, count, extra = parseCell(text)
        if workload == "W4":
            w4(context, address, size, count, extra or 100, serverPid)
            continue
        if s is None:
            s = _connect(context, address)
        fn = {"W1": w1, "W1p": w1p, "W2": w2, "W3": w3}[workload]
        meter = Meter(serverPid)
        ok = fn(s, size, count)
        meter.report(workload, size, count, ok)
    if s is not None:
        s.close()
    context.term()


def oneshot(address: str) -> bool:
    """W0: connect, one 64-byte round trip."""
    context = zmq.Context()
    s = _connect(context, address)
    p = payload(0, 64)
    ok = _request(s, b"E", p) == p
    s.close()
    context.term()
    return ok
