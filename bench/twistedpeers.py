"""
Servers and clients on Twisted: txqb itself, Twisted AMP and a plain
Int32StringReceiver over a unix socket, all speaking bench/protocol.py.

The workloads are written once over a small adapter per flavor
(``request``/``send`` returning Deferreds, an event callback), so every
flavor runs the same loop.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer, protocol, reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from bench.protocol import (
    BIG_MAX,
    ECHO,
    EVENTS,
    GATHER_FROM,
    PAIR,
    SINK,
    SMALL_MAX,
    STATS,
    U32,
    Meter,
    SinkCounter,
    parseCell,
    payload,
    payloadOk,
    payloadParts,
)

reactor: Any = _reactor
WINDOW = 32
"""Requests outstanding in W1p."""


# AMP: values are limited to 65 535 bytes, so large payloads are split
# over numbered keys, as AMP applications carrying big blobs do.


class BigBytes(amp.Argument):
    """Bytes of any length, as ``name`` (chunk count) and ``name.N`` keys."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.pop(name.decode())
        step = amp.MAX_VALUE_LENGTH
        chunks = [value[i : i + step] for i in range(0, len(value), step)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[name + b".%d" % i] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        n = int(strings.pop(name))
        objects[name.decode()] = b"".join(strings.pop(name + b".%d" % i) for i in range(n))


class Echo(amp.Command):
    arguments = [(b"data", BigBytes())]
    response = [(b"data", BigBytes())]


class Sink(amp.Command):
    arguments = [(b"data", BigBytes())]
    requiresAnswer = False


class Stats(amp.Command):
    response = [(b"data", amp.String())]


class Events(amp.Command):
    arguments = [(b"count", amp.Integer()), (b"size", amp.Integer())]
    response = [(b"count", amp.Integer())]


class Event(amp.Command):
    arguments = [(b"data", BigBytes())]
    requiresAnswer = False


class AmpServer(amp.AMP):
    def connectionMade(self) -> None:
        self.counter = SinkCounter()

    @Echo.responder
    def echo(self, data: bytes) -> Dict[str, bytes]:
        return {"data": data}

    @Sink.responder
    def sink(self, data: bytes) -> Dict[str, Any]:
        self.counter.sink(data)
        return {}

    @Stats.responder
    def stats(self) -> Dict[str, bytes]:
        return {"data": self.counter.stats()}

    @Events.responder
    def events(self, count: int, size: int) -> Deferred[Dict[str, int]]:
        return defer.ensureDeferred(self._burst(count, size))

    async def _burst(self, count: int, size: int) -> Dict[str, int]:
        for seq in range(count):
            self.callRemote(Event, data=payload(seq, size))
            await drained(self.transport)
        return {"count": count}


class AmpClientProtocol(amp.AMP):
    onEvent: Optional[Callable[[bytes], None]] = None

    @Event.responder
    def event(self, data: bytes) -> Dict[str, Any]:
        if self.onEvent is not None:
            self.onEvent(data)
        return {}


# Int32StringReceiver: one type byte, then the payload.

_I_ECHO, _I_SINK, _I_STATS, _I_EVENTS, _I_EVENT = b"E", b"S", b"T", b"V", b"v"


class Int32Server(Int32StringReceiver):
    MAX_LENGTH = 1 << 24

    def connectionMade(self) -> None:
        self.counter = SinkCounter()

    def stringReceived(self, data: bytes) -> None:
        kind = data[:1]
        if kind == _I_ECHO:
            self.sendString(data)
        elif kind == _I_SINK:
            self.counter.sink(data[1:])
        elif kind == _I_STATS:
            self.sendString(_I_STATS + self.counter.stats())
        elif kind == _I_EVENTS:
            defer.ensureDeferred(self._burst(*PAIR.unpack(data[1:])))

    async def _burst(self, count: int, size: int) -> None:
        for seq in range(count):
            self.sendString(_I_EVENT + payload(seq, size))
            await drained(self.transport)
        self.sendString(_I_EVENTS + U32.pack(count))


class Int32Client(Int32StringReceiver):
    MAX_LENGTH = 1 << 24
    onEvent: Optional[Callable[[bytes], None]] = None

    def connectionMade(self) -> None:
        self.waiting: List[Deferred[bytes]] = []
        self.nextWaiter = 0

    def stringReceived(self, data: bytes) -> None:
        if data[:1] == _I_EVENT:
            if self.onEvent is not None:
                self.onEvent(data[1:])
            return
        d = self.waiting[self.nextWaiter]
        self.nextWaiter += 1
        if self.nextWaiter > 1024:
            del self.waiting[: self.nextWaiter]
            self.nextWaiter = 0
        d.callback(data[1:])


async def drained(transport: Any) -> None:
    """
    Wait while a Twisted stream transport buffers over 1 MiB (a stream
    accepts writes without bound; the peer's reading is the back-pressure).
    """
    if len(transport.dataBuffer) + transport._tempDataLen > (1 << 20):
        while len(transport.dataBuffer) + transport._tempDataLen > (1 << 18):
            await _later(0)


def _later(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# Adapters: request(id, payload) -> Deferred[bytes payload]; send(id,
# payload) -> Deferred or None; onEvent(payload).


class TxqbConn:
    """txqb's client (the API under test)."""

    window = WINDOW

    @classmethod
    async def open(cls, address: str, maxSize: int, windowBytes: int) -> TxqbConn:
        import txqb

        self = cls()
        self.onEvent: Optional[Callable[[bytes], None]] = None
        self.client = await txqb.connect(
            reactor, address, maxMessageSize=maxSize, eventReceived=self._event,
            maxInFlight=WINDOW, maxInFlightBytes=windowBytes,
        )
        return self

    def _event(self, message: Any) -> None:
        if self.onEvent is not None and message.id == EVENTS:
            self.onEvent(message.payload)

    def request(self, msgId: int, data: bytes) -> Deferred[Any]:
        return self.client.request(msgId, data)

    @staticmethod
    def payloadOf(message: Any) -> bytes:
        if message.error != 0:
            raise RuntimeError(f"response {message.id} error {message.error}")
        data: bytes = message.payload
        return data

    def send(self, msgId: int, data: bytes) -> Optional[Deferred[None]]:
        d: Deferred[None] = self.client.send(msgId, data)
        return None if d.called and not isinstance(d.result, Failure) else d

    def close(self) -> Any:
        return self.client.disconnect()


class _StreamConn:
    """A Twisted protocol over a unix stream socket; subclasses name it."""

    proto: Any
    protocolClass: Any

    @classmethod
    async def open(cls, address: str, maxSize: int, windowBytes: int) -> Any:
        from twisted.internet.endpoints import UNIXClientEndpoint

        self = cls()
        factory = protocol.Factory.forProtocol(cls.protocolClass)
        self.proto = await UNIXClientEndpoint(reactor, address).connect(factory)
        return self

    @property
    def onEvent(self) -> Any:
        return self.proto.onEvent

    @onEvent.setter
    def onEvent(self, fn: Any) -> None:
        self.proto.onEvent = fn

    def close(self) -> Any:
        self.proto.transport.loseConnection()
        return None

    @staticmethod
    def payloadOf(data: Any) -> bytes:
        return data  # type: ignore[no-any-return]


class AmpConn(_StreamConn):
    protocolClass = AmpClientProtocol

    def request(self, msgId: int, data: bytes) -> Deferred[Any]:
        if msgId == ECHO:
            return self.proto.callRemote(Echo, data=data).addCallback(lambda r: r["data"])
        if msgId == STATS:
            return self.proto.callRemote(Stats).addCallback(lambda r: r["data"])
        count, size = PAIR.unpack(data)
        return self.proto.callRemote(Events, count=count, size=size).addCallback(
            lambda r: U32.pack(r["count"])
        )

    def send(self, msgId: int, data: bytes) -> None:
        self.proto.callRemote(Sink, data=data)


class Int32Conn(_StreamConn):
    _kinds = {ECHO: _I_ECHO, STATS: _I_STATS, EVENTS: _I_EVENTS, SINK: _I_SINK}

    protocolClass = Int32Client

    def request(self, msgId: int, data: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.proto.waiting.append(d)
        self.proto.sendString(self._kinds[msgId] + data)
        return d

    def send(self, msgId: int, data: bytes) -> None:
        self.proto.sendString(_I_SINK + data)


FLAVORS: Dict[str, Any] = {"txqb": TxqbConn, "amp": AmpConn, "int32": Int32Conn}


# Workloads, shared by every flavor.


async def w1(conn: Any, size: int, count: int) -> bool:
    payloads = [payload(0, size), payload(1, size)]
    request, payloadOf = conn.request, conn.payloadOf
    ok = True
    for i in range(count):
        p = payloads[i & 1]
        ok = payloadOf(await request(ECHO, p)) == p and ok
    return ok


async def w1p(conn: Any, size: int, count: int) -> bool:
    window = min(WINDOW, count)
    payloads = [payload(i, size) for i in range(window)]
    request, payloadOf = conn.request, conn.payloadOf
    finished: Deferred[None] = Deferred()
    state = {"sent": 0, "received": 0, "bad": 0}

    def issue() -> None:
        p = payloads[state["sent"] % window]
        state["sent"] += 1
        request(ECHO, p).addCallback(got, p).addErrback(failed)

    def got(result: Any, p: bytes) -> None:
        if payloadOf(result) != p:
            state["bad"] += 1
        state["received"] += 1
        if state["sent"] < count:
            issue()
        elif state["received"] == count:
            finished.callback(None)

    def failed(f: Failure) -> None:
        if not finished.called:
            finished.errback(f)

    for _ in range(window):
        issue()
    await finished
    return state["bad"] == 0


async def w2(conn: Any, size: int, count: int) -> bool:
    send = conn.send
    # txqb gathers the parts as the C client's sendv does; the stream
    # transports take one string, so those get it made.
    make = payloadParts if isinstance(conn, TxqbConn) and size >= GATHER_FROM else payload
    for i in range(count):
        d = send(SINK, make(i, size))
        if d is not None:
            await d
        elif not isinstance(conn, TxqbConn):
            await drained(conn.proto.transport)
    stats = conn.payloadOf(await conn.request(STATS, b""))
    return PAIR.unpack(stats) == (count, 0)  # type: ignore[no-any-return]


async def w3(conn: Any, size: int, count: int) -> bool:
    state = {"n": 0, "bad": 0}

    def onEvent(data: bytes) -> None:
        if not payloadOk(data, state["n"]) or len(data) != size:
            state["bad"] += 1
        state["n"] += 1

    conn.onEvent = onEvent
    reply = conn.payloadOf(await conn.request(EVENTS, PAIR.pack(count, size)))
    conn.onEvent = None
    return state["n"] == count and state["bad"] == 0 and reply == U32.pack(count)


async def w4(flavor: Any, address: str, size: int, rounds: int, clients: int,
             serverPid: int) -> None:
    conns = [await flavor.open(address, SMALL_MAX, SMALL_MAX) for _ in range(clients)]
    meter = Meter(serverPid)
    results = await defer.gatherResults(
        [defer.ensureDeferred(w1(c, size, rounds)) for c in conns]
    )
    meter.report("W4", size, rounds * clients, all(results))
    for c in conns:
        c.close()


async def runCells(flavorName: str, address: str, serverPid: int, cells: List[str],
                   windowBytes: int) -> None:
    flavor = FLAVORS[flavorName]
    conn = None
    for text in cells:
        workload, size, count, extra = parseCell(text)
        if workload == "W4":
            await w4(flavor, address, size, count, extra or 100, serverPid)
            continue
        if conn is None:
            conn = await flavor.open(address, BIG_MAX, windowBytes)
        fn = {"W1": w1, "W1p": w1p, "W2": w2, "W3": w3}[workload]
        meter = Meter(serverPid)
        ok = await fn(conn, size, count)
        meter.report(workload, size, count, ok)
    if conn is not None:
        await defer.maybeDeferred(conn.close)
    await _later(0.01)


def serve(flavorName: str, address: str, transport: str) -> None:
    """Run a server of ``flavorName`` until SIGTERM."""
    if flavorName == "txqb":
        import txqb

        # Handlers read requests in place, as C libqb's do.
        txqb.listen(reactor, address, TxqbBenchHandlers(), transport=transport,
                    maxMessageSizeCeiling=BIG_MAX + 8192, zeroCopy=True)
    else:
        from twisted.internet.endpoints import UNIXServerEndpoint

        cls = AmpServer if flavorName == "amp" else Int32Server
        if os.path.exists(address):
            os.unlink(address)
        # W4 connects 100 clients at once: more than the default backlog of 50.
        UNIXServerEndpoint(reactor, address, backlog=512).listen(protocol.Factory.forProtocol(cls))
    reactor.callWhenRunning(print, "READY", os.getpid(), flush=True)
    reactor.run()


def _txqbHandlers() -> Any:
    from txqb._wire.headers import Message
    from txqb.server import ServiceHandlers

    class Handlers(ServiceHandlers):
        """The benchmark protocol on txqb's server API."""

        def __init__(self) -> None:
            self.counters: Dict[Any, SinkCounter] = {}

        def connectionCreated(self, connection: Any) -> None:
            self.counters[connection] = SinkCounter()

        def connectionDestroyed(self, connection: Any) -> None:
            self.counters.pop(connection, None)

        def messageReceived(self, connection: Any, msgId: int, data: bytes) -> Any:
            if msgId == ECHO:
                return data
            if msgId == SINK:
                self.counters[connection].sink(data)
                return None
            if msgId == STATS:
                return Message(STATS, 0, self.counters[connection].stats())
            if msgId == EVENTS:
                return self._burst(connection, *PAIR.unpack(data))
            return Message(msgId, -22, b"")

        async def _burst(self, connection: Any, count: int, size: int) -> Any:
            sendEvent = connection.sendEvent
            make = payloadParts if size >= GATHER_FROM else payload
            for seq in range(count):
                d = sendEvent(EVENTS, make(seq, size))
                if not d.called or isinstance(d.result, Failure):
                    await d
            return Message(EVENTS, 0, U32.pack(count))

    return Handlers


def TxqbBenchHandlers() -> Any:
    """A fresh handlers object for a txqb bench server."""
    return _txqbHandlers()()
