"""
libqb-compatible clients on Twisted.

L{connect} opens a connection to any libqb service (a C daemon such as
corosync or pacemaker, or a txqb server) and returns a L{Client} whose
requests are L{Deferred}s: many may be outstanding at once, paired with
their responses by order as libqb does.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txqb._posix.sockets import Credentials, peerCredentials, streamClient
from txqb._reactor.shmtransport import ClientShmChannels
from txqb._reactor.sockettransport import ClientSocketChannels
from txqb._reactor.stream import SetupProtocol, UnixStreamTransport
from txqb._wire.handshake import (
    CONNECTION_RESPONSE_SIZE,
    MIN_CLIENT_MAX_MSG_SIZE,
    TRANSPORT_SHM,
    TRANSPORT_SOCKET,
    ConnectionRequest,
    ConnectionResponse,
)
from txqb._wire.headers import (
    MalformedMessage,
    Buffer,
    Gather,
    Message,
    Payload,
    decodeResponse,
    gathered,
    heldPayload,
    requestHeader,
)
from txqb._wire.naming import DEFAULT_SOCKET_DIR, serviceAddress
from txqb._wire.pairing import ReplyQueue, Slot
from txqb.errors import (
    ConnectionLostError,
    MessageTooLargeError,
    ProtocolError,
    QBError,
    QBTimeoutError,
    RefusedError,
    ServiceNotFoundError,
)
from txqb.server import filesystemSocketsForced

__all__ = ["connect", "Client", "ClientStats", "EventStream", "DEFAULT_MAX_MESSAGE_SIZE"]

log = Logger(namespace="txqb.client")

DEFAULT_MAX_MESSAGE_SIZE = 65536
"""The message size a client asks for unless told otherwise."""

DEFAULT_CONNECT_TIMEOUT = 30.0
"""Seconds L{connect} waits for a server's handshake by default."""

RESPONSE_SLACK = 4096
"""
Extra bytes a client accepts beyond the negotiated size in a response: C
servers do not check response sizes (an echo of a maximal request comes
back 8 bytes longer).
"""

DEFAULT_MAX_IN_FLIGHT = 32
"""
Requests a client keeps on the wire at once by default; more wait in the
client.  A C libqb server does not retry a response it cannot send at once
(``-EAGAIN``): it drops it, which would break the pairing of every later
response.  Keeping the responses in flight within what its socket buffer
holds makes pipelining safe against any libqb server.
"""

DEFAULT_MAX_IN_FLIGHT_BYTES = 128 * 1024
"""Request bytes a client keeps on the wire at once by default (see above)."""

_PEER_GONE = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})

_BACKLOG_RETRY = 0.005
_FC_POLL_FIRST = 0.001
_FC_POLL_MAX = 0.02


@dataclass
class ClientStats:
    """
    A client's own counters (libqb's client keeps none; see L{Client.stats}).

    @ivar requests: requests and sends put on the wire.
    @ivar responses: responses received (late ones for cancelled
        requests included).
    @ivar events: events received.
    @ivar flowControlWaits: times a send had to wait for the server's flow
        control to lift (where libqb's C client returns ``-EAGAIN``).
    @ivar outstanding: requests on the wire awaiting their response now.
    @ivar queued: requests and sends held back in the client now, by flow
        control or by the send window.
    """

    requests: int = 0
    responses: int = 0
    events: int = 0
    flowControlWaits: int = 0
    outstanding: int = 0
    queued: int = 0


class _Outgoing:
    """A request or send held back by flow control."""

    __slots__ = ("header", "payload", "size", "deferred", "expectsReply", "slot", "cancelled")

    def __init__(self, header: bytes, payload: Payload, deferred: Deferred[Any],
                 expectsReply: bool, size: int) -> None:
        self.header = header
        self.payload = payload
        self.size = size
        self.deferred = deferred
        self.expectsReply = expectsReply
        self.slot: Optional[Slot[Deferred[Any]]] = None
        self.cancelled = False


class EventStream:
    """
    The client's events as an asynchronous iterator::

        async for event in client.events():
            print(event.id, event.payload)

    Events are buffered while the consumer is busy; beyond C{highWater}
    buffered events the client stops reading them, so the server's
    L{sendEvent<txqb.server.ServerConnection.sendEvent>} waits instead of
    memory growing.  The iteration ends when the client disconnects and
    raises L{ConnectionLostError} when the connection is lost.
    """

    def __init__(self, client: Client, highWater: int) -> None:
        self._client = client
        self._highWater = highWater
        self._queue: Deque[Message] = deque()
        self._waiting: Optional[Deferred[None]] = None
        self._end: Optional[BaseException] = None
        self._paused = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Message:
        while not self._queue:
            if self._end is not None:
                if isinstance(self._end, StopAsyncIteration):
                    raise StopAsyncIteration
                raise self._end
            self._waiting = Deferred()
            await self._waiting
        event = self._queue.popleft()
        if self._paused and len(self._queue) <= self._highWater // 2:
            self._paused = False
            self._client._resumeEvents()
        return event

    def _deliver(self, event: Message) -> None:
        self._queue.append(event)
        if not self._paused and len(self._queue) > self._highWater:
            self._paused = True
            self._client._pauseEvents()
        self._wake()

    def _finish(self, error: BaseException) -> None:
        if self._end is None:
            self._end = error
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)


class Client:
    """
    A connection to a libqb service (``qb_ipcc_connection_t``).

    Made by L{connect}.

    @ivar serverCredentials: the server's pid, uid and gid, from the
        kernel (``qb_ipcc_auth_get``); check them before trusting a
        privileged daemon.
    @ivar maxMessageSize: the negotiated size
        (``qb_ipcc_get_buffer_size``).
    @ivar transportType: the transport the server chose.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        name: str,
        transport: UnixStreamTransport,
        response: ConnectionResponse,
        credentials: Credentials,
        eventReceived: Optional[Callable[[Message], None]],
        fcEnableMax: int,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
        maxInFlightBytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
    ) -> None:
        self.name = name
        self.maxInFlight = maxInFlight
        self.maxInFlightBytes = maxInFlightBytes
        self._inFlightSizes: Deque[int] = deque()
        self._inFlightBytes = 0
        self._reactor = reactor
        self._transport = transport
        self.serverCredentials = credentials
        self.maxMessageSize = response.maxMessageSize
        self.transportType = response.transport
        self.fcEnableMax = fcEnableMax
        self._zeroCopy = False
        self._deliveringInPlace = False
        self._receiveSize = self.maxMessageSize + RESPONSE_SLACK
        self._eventCallback = eventReceived
        self._stream: Optional[EventStream] = None
        self._replies: ReplyQueue[Deferred[Message]] = ReplyQueue()
        self._blocked: Deque[_Outgoing] = deque()
        self._fcCall: Optional[IDelayedCall] = None
        self._fcDelay = _FC_POLL_FIRST
        self._lost: Optional[BaseException] = None
        self._disconnectWaiters: List[Deferred[None]] = []
        self.requestsSent = 0
        self.responsesReceived = 0
        self.eventsReceived = 0
        self.flowControlWaits = 0
        self._channels: Union[ClientSocketChannels, ClientShmChannels]
        if response.transport == TRANSPORT_SOCKET:
            self._channels = ClientSocketChannels(
                reactor,
                response.request,
                response.response,
                self.maxMessageSize,
                self._receiveSize,
                self._responseReceived,
                self._eventReceived,
                self._channelFailed,
            )
        elif response.transport == TRANSPORT_SHM:
            self._channels = ClientShmChannels(
                reactor,
                transport,
                (response.request, response.response, response.event),
                self.maxMessageSize,
                self._responseReceived,
                self._eventReceived,
                self._channelFailed,
            )
        else:
            raise QBError(
                f"server chose transport {response.transport}, which libqb 2.x"
                " does not define",
                errno.ENOTSUP if response.transport in (2, 3) else errno.EINVAL,
            )

    def __repr__(self) -> str:
        return f"<txqb client {self.name!r} {'connected' if self.connected else 'closed'}>"

    @property
    def _clock(self) -> IReactorTime:
        return self._reactor  # type: ignore[return-value]

    # Public API

    @property
    def connected(self) -> bool:
        """True until the connection is closed or lost (``qb_ipcc_is_connected``)."""
        return self._lost is None

    @property
    def outstanding(self) -> int:
        """Requests sent whose responses have not arrived yet."""
        return len(self._replies)

    def request(
        self, msgId: int, payload: Gather = b"", timeout: Optional[float] = None
    ) -> Deferred[Message]:
        """
        Send a request and wait for its response (``qb_ipcc_sendv_recv``).

        C{payload} is C{bytes} or any buffer, or a tuple or list of them:
        the parts go out as one message, each copied once, straight into
        the ring or the socket, as ``qb_ipcc_sendv``'s iovec does.  A
        request that must wait for room keeps C{bytes} parts as they are
        and copies the others, so the caller may reuse its buffers at once.

        Any number may be outstanding; each response goes to the oldest
        request still waiting.  Cancelling the L{Deferred}, or its
        C{timeout} expiring, keeps the request's place: its late response
        is read and dropped, so later requests still get their own.

        @return: a L{Deferred} firing with the response L{Message}, or
            failing with L{MessageTooLargeError} (nothing sent),
            L{QBTimeoutError}, L{ProtocolError} (a malformed response) or
            L{ConnectionLostError}.
        """
        d: Deferred[Message] = self._submit(msgId, payload, expectsReply=True)
        if timeout is not None and not d.called:
            d.addTimeout(timeout, self._clock, self._timedOut)
        return d

    def send(self, msgId: int, payload: Gather = b"") -> Deferred[None]:
        """
        Send a request that expects no response (``qb_ipcc_send``, or
        ``qb_ipcc_sendv`` with a tuple or list of parts: see L{request}).

        @return: a L{Deferred} that fires once the message is in the
            server's queue.  While the server has flow control on it waits
            (libqb's C client returns ``-EAGAIN`` instead).  A response the
            server sends anyway is handed to the oldest waiting L{request},
            exactly as in libqb, so use this only for messages the service
            never answers.
        """
        return self._submit(msgId, payload, expectsReply=False)

    @property
    def zeroCopy(self) -> bool:
        """
        Whether responses and event callbacks get their payload as a view
        into the ring or the receive buffer (see L{connect}'s C{zeroCopy}).
        """
        return self._zeroCopy

    @zeroCopy.setter
    def zeroCopy(self, value: bool) -> None:
        self._zeroCopy = bool(value)
        if isinstance(self._channels, ClientShmChannels):
            self._channels.inPlace = self._zeroCopy

    def stats(self, clearAfterRead: bool = False) -> ClientStats:
        """
        A snapshot of the client's counters.

        @param clearAfterRead: zero the counters after reading them (the
            outstanding and queued figures are states and are not reset).
        """
        snapshot = ClientStats(
            self.requestsSent,
            self.responsesReceived,
            self.eventsReceived,
            self.flowControlWaits,
            len(self._replies),
            len(self._blocked),
        )
        if clearAfterRead:
            self.requestsSent = self.responsesReceived = 0
            self.eventsReceived = self.flowControlWaits = 0
        return snapshot

    def events(self, highWater: int = 10000) -> EventStream:
        """
        The client's events as an asynchronous iterator (L{EventStream}).

        There is one stream per client: later calls return the same stream,
        and C{highWater} counts only on the first.
        """
        if self._stream is None:
            self._stream = EventStream(self, highWater)
            if self._lost is not None:
                self._stream._finish(self._lost)
        return self._stream

    def disconnect(self) -> Deferred[None]:
        """
        Close the connection (``qb_ipcc_disconnect``); outstanding requests
        fail with L{ConnectionLostError}.
        """
        self._shutDown(StopAsyncIteration(), ConnectionLostError("disconnected by the client"))
        return succeed(None)

    def whenDisconnected(self) -> Deferred[None]:
        """A L{Deferred} that fires once the connection is closed or lost."""
        if self._lost is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._disconnectWaiters.append(d)
        return d

    # Sending

    def _submit(self, msgId: int, payload: Gather, expectsReply: bool) -> Deferred[Any]:
        if self._lost is not None:
            return fail(ConnectionLostError(f"{self!r}: {self._lost}"))
        if type(payload) is bytes:
            length = len(payload)  # (the common case, without a call)
        else:
            payload, length = gathered(payload)
        header = requestHeader(msgId, length)
        size = len(header) + length
        if size > self.maxMessageSize:
            return fail(
                MessageTooLargeError(
                    f"request of {size} bytes exceeds the connection's"
                    f" {self.maxMessageSize}-byte limit"
                )
            )
        # Flow control is read once per decision: the server may turn it
        # off between two reads, and a request held back for it must then
        # still have its poll scheduled.
        free = not (self._blocked or self._deliveringInPlace) and (
            not expectsReply or self._windowOpen()
        )
        flowControlled = self._flowControlled()
        if free and not flowControlled:
            # What goes at once (the common case) needs no record: a send's
            # Deferred has fired before anyone has it, and a request's
            # place in the reply queue is all its cancel needs.
            try:
                queued = self._channels.sendRequest(header, payload)
            except OSError as e:
                item = self._outgoing(header, payload, expectsReply, size)
                self._sendFailed(item, e)
                return item.deferred
            self.requestsSent += 1
            if expectsReply:
                slot: Slot[Deferred[Any]] = Slot(None)
                d: Deferred[Any] = Deferred(slot.abandon)
                slot.waiter = d
                self._awaitReply(slot, size, queued)
                return d
            if queued is None:
                return succeed(None)
            item = self._outgoing(header, payload, False, size)
            queued.addCallbacks(item.deferred.callback, item.deferred.errback)
            return item.deferred
        # Held back: behind earlier ones (their wait pumps this one too),
        # by the window (the next response pumps), by a delivery in place
        # (pumped once it ends) or by flow control (polled for).
        item = self._outgoing(header, payload, expectsReply, size)
        if not isinstance(payload, bytes):
            item.payload = heldPayload(payload)  # the caller may reuse its buffers
        self._blocked.append(item)
        if flowControlled:
            self._waitForFlowControl()
        return item.deferred

    def _outgoing(self, header: bytes, payload: Payload, expectsReply: bool,
                  size: int) -> _Outgoing:
        item = _Outgoing(header, payload, Deferred(lambda d: self._cancel(item)), expectsReply,
                         size)
        return item

    def _flowControlled(self) -> bool:
        fc = self._channels.flowControl()
        return 0 < fc <= self.fcEnableMax

    def _windowOpen(self) -> bool:
        # The window applies only while something is in flight, so one
        # request always goes: the window can never deadlock.
        replies = self._replies
        return not replies or (len(replies) < self.maxInFlight
                               and self._inFlightBytes < self.maxInFlightBytes)

    def _transmit(self, item: _Outgoing) -> None:
        try:
            queued = self._channels.sendRequest(item.header, item.payload)
        except OSError as e:
            self._sendFailed(item, e)
            return
        self.requestsSent += 1
        if item.expectsReply:
            item.slot = Slot(item.deferred)
            self._awaitReply(item.slot, item.size, queued)
        elif queued is None:
            item.deferred.callback(None)
        else:
            queued.addCallbacks(item.deferred.callback, item.deferred.errback)

    def _awaitReply(self, slot: Slot[Deferred[Any]], size: int,
                    queued: Optional[Deferred[None]]) -> None:
        """Take the next place in the reply queue, for a request just sent."""
        if not self._replies:
            self._channels.awaiting(True)
        self._replies.append(slot)
        self._inFlightSizes.append(size)
        self._inFlightBytes += size
        if queued is not None:
            # Its failure is the connection's loss, which fails the slot.
            queued.addErrback(lambda _: None)

    def _sendFailed(self, item: _Outgoing, e: OSError) -> None:
        if e.errno in _PEER_GONE:
            # The server's socket is gone: this is a lost connection,
            # and it fails everything outstanding, this item included.
            self._blocked.appendleft(item)
            self._channelFailed(e)
        else:
            item.deferred.errback(QBError(f"send failed: {e.strerror}", e.errno))

    def _cancel(self, item: _Outgoing) -> None:
        if item.slot is not None:
            item.slot.abandon()
        else:
            item.cancelled = True

    def _timedOut(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):
            raise QBTimeoutError(f"no response within {timeout} s")
        return result

    def _waitForFlowControl(self) -> None:
        if self._fcCall is None:
            self.flowControlWaits += 1
            self._fcCall = self._clock.callLater(self._fcDelay, self._pump)
            self._fcDelay = min(self._fcDelay * 2, _FC_POLL_MAX)

    def _pump(self) -> None:
        self._fcCall = None
        blocked = self._blocked
        while blocked:
            if self._lost is not None:
                return
            if blocked[0].cancelled:
                blocked.popleft()
                continue
            if self._flowControlled():
                self._waitForFlowControl()
                return
            if self._deliveringInPlace or (blocked[0].expectsReply and not self._windowOpen()):
                return  # pumped again once the delivery ends, or by the next response
            self._transmit(blocked.popleft())
        self._fcDelay = _FC_POLL_FIRST

    # Receiving

    def _responseReceived(self, data: Buffer) -> None:
        decoded: Union[Message, MalformedMessage]
        try:
            decoded = decodeResponse(data, self._receiveSize, copy=not self._zeroCopy)
        except MalformedMessage as e:
            decoded = e
        if not self._zeroCopy:
            # The payload is copied out: the channel has its room back
            # before any callback runs (and maybe sends).
            self._channels.consumed()
            self._pairResponse(decoded)
            return
        # While the data is a view into the response ring, requests wait
        # (the pump runs on the next turn, once the ring has its room back):
        # a C server drops a response it finds no room for.
        self._deliveringInPlace = True
        try:
            self._takeResponse(decoded)
        finally:
            self._deliveringInPlace = False
        if self._blocked and self._fcCall is None:
            self._fcCall = self._clock.callLater(0, self._pump)

    def _takeResponse(self, message: Union[Message, MalformedMessage]) -> None:
        try:
            self._pairResponse(message)
        finally:
            if self._zeroCopy and isinstance(message, Message):
                view: Any = message.payload
                view.release()

    def _pairResponse(self, message: Union[Message, MalformedMessage]) -> None:
        self._channels.drainEvents()
        try:
            waiter = self._replies.pop()
        except LookupError:
            log.warn("{c!r}: dropping a response no request is waiting for", c=self)
            return
        self._inFlightBytes -= self._inFlightSizes.popleft()
        self.responsesReceived += 1
        if not self._replies:
            self._channels.awaiting(False)
        if self._blocked and self._fcCall is None:
            self._pump()
        if waiter is None:
            return
        if isinstance(message, MalformedMessage):
            waiter.errback(ProtocolError(f"malformed response: {message.reason}", message.errno))
            return
        waiter.callback(message)

    def _eventReceived(self, data: Buffer) -> None:
        try:
            event = decodeResponse(data, self._receiveSize, copy=not self._zeroCopy)
        except MalformedMessage as e:
            log.error("{c!r}: dropping a malformed event: {why}", c=self, why=e.reason)
            return
        if not self._zeroCopy:
            self._channels.consumed()
        self.eventsReceived += 1
        if self._eventCallback is not None:
            try:
                self._eventCallback(event)
            except Exception:
                log.failure("{c!r}: event callback failed", c=self)
        if self._zeroCopy:
            if self._stream is not None:
                # The stream keeps events until they are consumed.
                self._stream._deliver(Message(event.id, event.error, bytes(event.payload)))
            view: Any = event.payload
            view.release()
        elif self._stream is not None:
            self._stream._deliver(event)

    def _pauseEvents(self) -> None:
        if self._lost is None:
            self._channels.pauseEvents()

    def _resumeEvents(self) -> None:
        if self._lost is None:
            self._channels.resumeEvents()

    # Teardown

    def _setupData(self, data: bytes) -> None:
        self._channels.setupBytesReceived(data)

    def _setupLost(self, reason: Failure) -> None:
        if self._lost is None:
            # Deliver what the server sent before it went away: its last
            # responses and events may still sit in our queues.
            self._channels.drain()
        error = ConnectionLostError(f"service {self.name!r} closed the connection")
        self._shutDown(error, error)

    def _channelFailed(self, error: BaseException) -> None:
        lost = ConnectionLostError(f"service {self.name!r}: transport failed: {error}")
        self._shutDown(lost, lost)

    def _shutDown(self, streamEnd: BaseException, error: ConnectionLostError) -> None:
        if self._lost is not None:
            return
        self._lost = error
        if self._fcCall is not None:
            self._fcCall.cancel()
            self._fcCall = None
        self._transport.abortConnection()
        self._channels.close(error)
        waiters = self._replies.drain()
        blocked, self._blocked = self._blocked, deque()
        waiters.extend(item.deferred for item in blocked if not item.cancelled)
        for d in waiters:
            d.errback(error)
        if self._stream is not None:
            self._stream._finish(streamEnd)
        done, self._disconnectWaiters = self._disconnectWaiters, []
        for w in done:
            w.callback(None)


class _Connector:
    """The client half of the handshake, as a small state machine."""

    def __init__(
        self,
        reactor: IReactorFDSet,
        name: str,
        address: bytes,
        maxMessageSize: int,
        timeout: float,
        eventReceived: Optional[Callable[[Message], None]],
        fcEnableMax: int,
        maxInFlight: int,
        maxInFlightBytes: int,
    ) -> None:
        self._reactor = reactor
        self._name = name
        self._window = (maxInFlight, maxInFlightBytes)
        self._address = address
        self._maxMessageSize = max(maxMessageSize, MIN_CLIENT_MAX_MSG_SIZE)
        self._eventReceived = eventReceived
        self._fcEnableMax = fcEnableMax
        self._buffer = b""
        self._transport: Optional[UnixStreamTransport] = None
        self._retry: Optional[IDelayedCall] = None
        self._done = False
        self.deferred: Deferred[Client] = Deferred(lambda _: self._abort())
        clock: IReactorTime = reactor  # type: ignore[assignment]
        self._timer: Optional[IDelayedCall] = clock.callLater(timeout, self._timedOut, timeout)

    def start(self) -> None:
        self._retry = None
        try:
            sock = streamClient(self._address)
        except (BlockingIOError, InterruptedError):
            # The server's backlog is full: a unix-socket connect cannot be
            # waited for, so try again shortly (never block the reactor).
            clock: IReactorTime = self._reactor  # type: ignore[assignment]
            self._retry = clock.callLater(_BACKLOG_RETRY, self.start)
            return
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                self._fail(
                    ServiceNotFoundError(f"no libqb service {self._name!r} is listening", e.errno)
                )
            else:
                self._fail(QBError(f"cannot connect to {self._name!r}: {e.strerror}", e.errno))
            return
        self._transport = UnixStreamTransport(
            sock, SetupProtocol(self), self._reactor, self._address, wantCredentials=True
        )
        self._transport.write(ConnectionRequest(self._maxMessageSize).encode())
        self._transport.startReading()  # type: ignore[no-untyped-call]

    def _setupData(self, data: bytes) -> None:
        # Unlike libqb 2.0.6, which fails with EAGAIN if the 12328-byte
        # response is not all there at the first wake-up, accumulate it.
        self._buffer += data
        if len(self._buffer) < CONNECTION_RESPONSE_SIZE:
            return
        transport = self._transport
        assert transport is not None
        raw = self._buffer[:CONNECTION_RESPONSE_SIZE]
        rest = self._buffer[CONNECTION_RESPONSE_SIZE:]
        self._buffer = b""
        try:
            response = ConnectionResponse.decode(raw)
        except MalformedMessage as e:
            self._fail(ProtocolError(f"bad connection response: {e.reason}", e.errno))
            return
        if response.error != 0:
            self._fail(RefusedError.fromResponse(self._name, response.error))
            return
        transport.wantCredentials = False
        credentials = transport.credentials or peerCredentials(transport.socket)
        try:
            client = Client(
                self._reactor,
                self._name,
                transport,
                response,
                credentials,
                self._eventReceived,
                self._fcEnableMax,
                *self._window,
            )
        except QBError as e:
            self._fail(e)
            return
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None) or errno.EBADMSG
            self._fail(QBError(f"cannot open the server's transport: {e}", code))
            return
        self._stopTimers()
        self._done = True
        protocol = transport.protocol
        assert isinstance(protocol, SetupProtocol)
        protocol.owner = client
        self.deferred.callback(client)
        if rest:
            client._setupData(rest)

    def _setupLost(self, reason: Failure) -> None:
        if self._done:
            return
        self._transport = None
        self._fail(
            ConnectionLostError(f"service {self._name!r} closed the connection during the handshake")
        )

    def _timedOut(self, timeout: float) -> None:
        self._timer = None
        self._fail(QBTimeoutError(f"service {self._name!r} did not answer within {timeout} s"))

    def _stopTimers(self) -> None:
        for call in (self._timer, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._retry = None

    def _abort(self) -> None:
        # Set first: closing the transport below reports a lost connection,
        # which must not overtake the error (or cancellation) being reported.
        self._done = True
        self._stopTimers()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abortConnection()

    def _fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._abort()
        self.deferred.errback(error)


def connect(
    reactor: IReactorFDSet,
    name: str,
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    eventReceived: Optional[Callable[[Message], None]] = None,
    fcEnableMax: int = 1,
    filesystemSockets: Optional[bool] = None,
    socketDirectory: str = DEFAULT_SOCKET_DIR,
    maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
    maxInFlightBytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
    zeroCopy: bool = False,
) -> Deferred[Client]:
    """
    Connect to the libqb service C{name} (``qb_ipcc_connect``), without
    ever blocking the reactor.

    @param reactor: any reactor providing L{IReactorFDSet} and
        L{IReactorTime}.
    @param name: the service name, as a C server gives it to
        ``qb_ipcs_create``.
    @param maxMessageSize: the message size to ask for; raised to libqb's
        client minimum of 12328.  The server may grant more.
    @param timeout: seconds to wait for the server's handshake.
    @param eventReceived: called with every event (a L{Message}); events
        are also available from L{Client.events}.
    @param fcEnableMax: the highest flow-control value that holds sends
        back (``qb_ipcc_fc_enable_max_set``): 1 by default, 2 to honour
        C{RATE_OFF_2} too, 0 to ignore flow control.
    @param filesystemSockets: connect to a filesystem socket in
        C{socketDirectory}; by default, when
        C{/etc/libqb/force-filesystem-sockets} exists, as libqb decides.
    @param socketDirectory: where filesystem setup sockets live (Debian's
        libqb: C{/tmp}).
    @param maxInFlight: requests kept on the wire at once; more wait in
        the client (see L{DEFAULT_MAX_IN_FLIGHT} for why).  Raise it
        against txqb servers, which never drop a response.
    @param maxInFlightBytes: request bytes kept on the wire at once.
    @param zeroCopy: give responses and C{eventReceived} callbacks their
        payload as a C{memoryview} straight into the shared-memory ring
        (SHM) or the receive buffer (socket), released once the callbacks
        return.  Code resumed by C{await client.request(...)} runs within
        that time, up to its next C{await}: copy (C{bytes(payload)}) what
        it keeps.  Events read from L{Client.events} are always copies.
        Also settable later as C{Client.zeroCopy}.
    @return: a cancellable L{Deferred} firing with a L{Client}; it fails
        with L{ServiceNotFoundError}, L{RefusedError} (carrying the
        server's errno), L{QBTimeoutError} or L{ConnectionLostError}.
    """
    if fcEnableMax not in (0, 1, 2):
        return fail(ValueError("fcEnableMax must be 0, 1 or 2, as in libqb"))
    if maxInFlight < 1 or maxInFlightBytes < 1:
        return fail(ValueError("maxInFlight and maxInFlightBytes must be positive"))
    try:
        address = serviceAddress(
            name,
            filesystemSocketsForced() if filesystemSockets is None else filesystemSockets,
            socketDirectory,
        )
    except ValueError as e:
        return fail(e)
    connector = _Connector(
        reactor,
        name,
        address,
        maxMessageSize,
        timeout,
        eventReceived,
        fcEnableMax,
        maxInFlight,
        maxInFlightBytes,
    )
    connector.start()
    if zeroCopy:
        connector.deferred.addCallback(_enableZeroCopy)
    return connector.deferred


def _enableZeroCopy(client: Client) -> Client:
    client.zeroCopy = True
    return client
