"""
libqb-compatible servers on Twisted.

L{listen} binds a service name; every client that connects gets a
L{ServerConnection}, and the service's L{IServiceHandlers} decide what to
do with it, exactly where libqb calls its ``qb_ipcs_service_handlers``.
C libqb clients (``qb_ipcc_connect``) and txqb clients connect alike.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Deque, Dict, List, Optional, Set, Union

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._posix.files import SHM_DIR, PrivateDirectory
from txqb._posix.sockets import Credentials, peerCredentials, streamListener
from txqb._reactor.hub import readerHubFor
from txqb._reactor.shmtransport import ServerShmChannels
from txqb._reactor.sockettransport import ServerSocketChannels
from txqb._reactor.stream import SetupProtocol, UnixStreamTransport
from txqb._wire.handshake import (
    CONNECTION_REQUEST_SIZE,
    TRANSPORT_SHM,
    TRANSPORT_SOCKET,
    ConnectionRequest,
    ConnectionResponse,
    negotiateMaxMessageSize,
)
from txqb._wire.headers import (
    MSG_AUTHENTICATE,
    MSG_DISCONNECT,
    MSG_NEW_EVENT_SOCK,
    Buffer,
    Gather,
    MalformedMessage,
    Message,
    decodeRequest,
    gathered,
    heldPayload,
    responseHeader,
)
from txqb._wire.naming import (
    DEFAULT_SOCKET_DIR,
    FORCE_FILESYSTEM_FLAG,
    descriptionTemplate,
    serviceAddress,
)
from txqb.errors import ConnectionLostError, MessageTooLargeError, QBError
from txqb.interfaces import IServiceHandlers

__all__ = [
    "listen",
    "Service",
    "ServiceHandlers",
    "ServerConnection",
    "ConnectionStats",
    "ServiceStats",
    "RATE_FAST",
    "RATE_NORMAL",
    "RATE_SLOW",
    "RATE_OFF",
    "RATE_OFF_2",
    "DEFAULT_MAX_MESSAGE_SIZE_CEILING",
    "transportFromName",
    "filesystemSocketsForced",
]

log = Logger(namespace="txqb.server")

RATE_FAST = 0
"""``QB_IPCS_RATE_FAST``."""
RATE_NORMAL = 1
"""``QB_IPCS_RATE_NORMAL``, the default."""
RATE_SLOW = 2
"""``QB_IPCS_RATE_SLOW``."""
RATE_OFF = 3
"""``QB_IPCS_RATE_OFF``: stop reading requests; clients see flow control 1."""
RATE_OFF_2 = 4
"""``QB_IPCS_RATE_OFF_2``: stop reading; clients see flow control 2."""

_FLOW_CONTROL = {RATE_OFF: 1, RATE_OFF_2: 2}

# Requests read from one connection per wake-up, as libqb's dispatcher
# does (``_request_q_len_get``): up to 50 at RATE_FAST, 5 at RATE_NORMAL,
# one at RATE_SLOW.  libqb also moves the connections between its loop's
# priority levels; a Twisted reactor has none, and the batch size is what
# gives a fast service its larger share of the reactor's turns.  A batch
# ends the turn only when something else wants the reactor (see
# txqb._reactor.peek): a turn costs far more in Twisted than in C.
_BATCH = {RATE_FAST: 50, RATE_NORMAL: 5, RATE_SLOW: 1, RATE_OFF: 1, RATE_OFF_2: 1}

DEFAULT_MAX_MESSAGE_SIZE_CEILING = 16 * 1024 * 1024
"""
The largest message size a txqb server grants unless told otherwise.

libqb grants any size a client asks for (a 4 GiB wish makes it create
gigabytes of shared memory); txqb refuses wishes above this with
``EMSGSIZE``.
"""

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection may take to send its connection request."""

_CLOSED_RETRY_INTERVAL = 0.1


def transportFromName(name: str) -> int:
    """Map ``"socket"``/``"shm"`` (or ``"native"``) to a transport type."""
    try:
        return {"socket": TRANSPORT_SOCKET, "shm": TRANSPORT_SHM, "native": TRANSPORT_SHM}[
            name
        ]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}: use 'socket' or 'shm'") from None


def filesystemSocketsForced(flagPath: str = FORCE_FILESYSTEM_FLAG) -> bool:
    """
    Whether libqb on this host uses filesystem setup sockets: the flag
    file exists (libqb checks with ``stat``, so a dangling name does not
    count).
    """
    return os.path.exists(flagPath)


@implementer(IServiceHandlers)
class ServiceHandlers:
    """
    Handlers with libqb's defaults: accept everyone, answer every request
    with ``-EINVAL``.  Subclass and override what the service needs.
    """

    def connectionAccepted(self, connection: ServerConnection, uid: int, gid: int) -> int:
        """Accept every client (libqb leaves the policy to the service)."""
        return 0

    def connectionCreated(self, connection: ServerConnection) -> None:
        """Nothing to do by default."""

    def messageReceived(
        self, connection: ServerConnection, msgId: int, payload: bytes
    ) -> Any:
        """Answer ``-EINVAL``: this service knows no request."""
        return Message(msgId, -errno.EINVAL, b"")

    def connectionClosed(self, connection: ServerConnection) -> Any:
        """Nothing to do by default."""
        return None

    def connectionDestroyed(self, connection: ServerConnection) -> None:
        """Nothing to release by default."""


class _State(Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class ConnectionStats:
    """
    One connection's counters, field for field libqb's
    ``qb_ipcs_connection_stats_2`` (see L{ServerConnection.stats}).

    @ivar clientPid: the client's pid, from the kernel.
    @ivar requests: requests read (``QB_IPC_MSG_DISCONNECT`` excluded).
    @ivar responses: responses sent.
    @ivar events: events sent.
    @ivar sendRetries: responses and events that found the channel full
        and had to wait (where libqb returns ``-EAGAIN``).
    @ivar recvRetries: wake-ups that found no request to read.
    @ivar flowControlState: the flow-control word clients see now (0, 1
        or 2).
    @ivar flowControlCount: how often that word changed.
    @ivar eventQueueLength: events sent and not yet read by the client.
    """

    clientPid: int = 0
    requests: int = 0
    responses: int = 0
    events: int = 0
    sendRetries: int = 0
    recvRetries: int = 0
    flowControlState: int = 0
    flowControlCount: int = 0
    eventQueueLength: int = 0


@dataclass
class ServiceStats:
    """
    A service's counters (libqb's ``qb_ipcs_stats``).

    @ivar activeConnections: established connections now.
    @ivar closedConnections: established connections that have closed
        since the service started or the counter was last cleared.
    """

    activeConnections: int = 0
    closedConnections: int = 0


# Answers that are neither awaitable nor Deferred (a zero-copy echo's
# memoryview among them), told apart without an ABC isinstance.
_PLAIN_RESULTS = frozenset((bytes, bytearray, memoryview, Message, type(None)))


def _owned(result: Any) -> Any:
    # An answer that waits behind earlier ones, made to outlive the request
    # (a zero-copy request's views, a Message's parts among them).
    if isinstance(result, (bytearray, memoryview)):
        return heldPayload(result)
    if isinstance(result, Message) and not isinstance(result.payload, bytes):
        return Message(result.id, result.error, heldPayload(gathered(result.payload)[0]))
    return result


class _ReplySlot:
    __slots__ = ("msgId", "ready", "result")

    def __init__(self, msgId: int) -> None:
        self.msgId = msgId
        self.ready = False
        self.result: Any = None


class ServerConnection:
    """
    One client's connection to a L{Service} (libqb's
    ``qb_ipcs_connection_t``).

    @ivar credentials: the client's pid, uid and gid, from the kernel.
    @ivar context: free for the service's own per-connection state
        (``qb_ipcs_context_set``).
    @ivar maxMessageSize: the negotiated size, 0 until the handshake.
    @ivar description: the connection's name prefix inside its private
        directory, as libqb logs it (``/dev/shm/qb-S-C-FD-XXXXXX/qb``).
    """

    def __init__(self, service: Service, sock: socket.socket, credentials: Credentials) -> None:
        self.service = service
        self.credentials = credentials
        self.context: Any = None
        self.maxMessageSize = 0
        self.description = ""
        self._stats = ConnectionStats(clientPid=credentials.pid)
        self._emptyReadsBase = 0
        self._reactor = service._reactor
        self._state = _State.HANDSHAKE
        self._buffer = b""
        self._directory: Optional[PrivateDirectory] = None
        self._channels: Optional[Union[ServerSocketChannels, ServerShmChannels]] = None
        self._auth = (credentials.uid, credentials.gid, 0o600)
        self._replySlots: Deque[_ReplySlot] = deque()
        self._closedWaiters: List[Deferred[None]] = []
        self._closedRetry: Optional[IDelayedCall] = None
        self._fd = sock.fileno()
        self._askedAccept = False
        # A server's connections share one reader of the reactor: a busy
        # server's wake-ups then cost one pass of the reactor's dispatch
        # per turn, not one per connection (txqb._reactor.hub).
        self._transport = UnixStreamTransport(
            sock, SetupProtocol(self), self._reactor, service.address,
            readers=readerHubFor(self._reactor),
        )
        self._handshakeTimer: Optional[IDelayedCall] = self._clock.callLater(
            service.handshakeTimeout, self._handshakeTimedOut
        )
        self._transport.startReading()  # type: ignore[no-untyped-call]

    @property
    def _clock(self) -> IReactorTime:
        return self._reactor  # type: ignore[return-value]

    def __repr__(self) -> str:
        pid, uid, gid = self.credentials
        return (
            f"<txqb connection {self.service.name!r} pid={pid} uid={uid}"
            f" gid={gid} {self._state.value}>"
        )

    # Public API

    @property
    def connected(self) -> bool:
        """True from the end of the handshake until the teardown begins."""
        return self._state is _State.ESTABLISHED

    def setAuth(self, uid: int, gid: int, mode: int) -> None:
        """
        Owner, group and mode of this connection's shared files
        (``qb_ipcs_connection_auth_set``); effective only when called from
        L{IServiceHandlers.connectionAccepted}.
        """
        self._auth = (uid, gid, mode)

    def respond(self, msgId: int, payload: Gather = b"", error: int = 0) -> Deferred[None]:
        """
        Send a response (``qb_ipcs_response_send``; with a tuple or list
        of buffers, ``qb_ipcs_response_sendv``: the parts go out as one
        message, gathered where they are, and the caller may reuse its
        buffers at once).

        Clients pair responses with requests by order, so send exactly one
        per request that expects one, in request order.

        @return: a L{Deferred} that fires when the response is in the
            client's hands (at once, unless the channel is full: then it
            waits, where libqb would return ``-EAGAIN``).  It fails with
            L{MessageTooLargeError} for a message larger than the
            negotiated size and L{ConnectionLostError} when the connection
            is gone.
        """
        return self._send(msgId, payload, error, response=True)

    def sendEvent(self, msgId: int, payload: Gather = b"", error: int = 0) -> Deferred[None]:
        """
        Send an event (``qb_ipcs_event_send``, or ``qb_ipcs_event_sendv``
        with parts, as L{respond}), waiting out a full channel.

        @return: as L{respond}.
        """
        return self._send(msgId, payload, error, response=False)

    def disconnect(self) -> None:
        """Drop the connection (``qb_ipcs_disconnect``)."""
        self._teardown("disconnected by the server")

    def whenClosed(self) -> Deferred[None]:
        """A L{Deferred} that fires once the connection is fully torn down."""
        if self._state is _State.CLOSED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closedWaiters.append(d)
        return d

    def eventQueueLength(self) -> int:
        """Events sent and not yet read by the client."""
        return self._channels.eventQueueLength() if self._channels else 0

    def stats(self, clearAfterRead: bool = False) -> ConnectionStats:
        """
        A snapshot of this connection's counters
        (``qb_ipcs_connection_stats_get_2``).

        @param clearAfterRead: zero the counters after reading them, as
            libqb does (the pid and the flow-control state are facts, not
            counters, and stay).
        """
        channels = self._channels
        emptyReads = channels.emptyReads if channels is not None else self._emptyReadsBase
        snapshot = replace(
            self._stats,
            recvRetries=emptyReads - self._emptyReadsBase,
            eventQueueLength=self.eventQueueLength(),
        )
        if clearAfterRead:
            self._stats = ConnectionStats(
                clientPid=self.credentials.pid,
                flowControlState=self._stats.flowControlState,
            )
            self._emptyReadsBase = emptyReads
        return snapshot

    @property
    def bufferSize(self) -> int:
        """
        The negotiated message size (``qb_ipcs_connection_get_buffer_size``):
        the largest request, response or event, header included.
        """
        return self.maxMessageSize

    @property
    def serviceId(self) -> int:
        """The service's id (``qb_ipcs_service_id_get``)."""
        return self.service.serviceId

    # Sending

    def _send(self, msgId: int, payload: Gather, error: int, response: bool) -> Deferred[None]:
        queued = self._transmit(msgId, payload, error, response)
        return succeed(None) if queued is None else queued

    def _transmit(self, msgId: int, payload: Gather, error: int,
                  response: bool) -> Optional[Deferred[None]]:
        """
        L{_send}, but L{None} for a message already in the channel (the
        common case, which then costs no L{Deferred}).
        """
        channels = self._channels
        if self._state is not _State.ESTABLISHED or channels is None:
            return fail(ConnectionLostError(f"{self!r} is not connected"))
        if type(payload) is bytes:
            length = len(payload)  # (the common case, without a call)
        else:
            payload, length = gathered(payload)
        header = responseHeader(msgId, error, length)
        size = len(header) + length
        if size > self.maxMessageSize:
            return fail(
                MessageTooLargeError(
                    f"{'response' if response else 'event'} of {size} bytes"
                    f" exceeds the connection's {self.maxMessageSize}-byte limit"
                )
            )
        try:
            if response:
                queued = channels.sendResponse(header, payload)
                self._stats.responses += 1
            else:
                queued = channels.sendEvent(header, payload)
                self._stats.events += 1
        except OSError as e:
            return fail(QBError(f"send failed: {e.strerror}", e.errno))
        if queued is None:
            return None
        if not queued.called:
            # It waits for room in the channel, where libqb would have
            # returned -EAGAIN: libqb counts that as a send retry.
            self._stats.sendRetries += 1
        return queued

    # Handshake

    def _setupData(self, data: bytes) -> None:
        if self._state is _State.HANDSHAKE:
            self._buffer += data
            if len(self._buffer) < CONNECTION_REQUEST_SIZE:
                return
            request = self._buffer[:CONNECTION_REQUEST_SIZE]
            rest = self._buffer[CONNECTION_REQUEST_SIZE:]
            self._buffer = b""
            self._handshake(request)
            data = rest
            if not data:
                return
        if self._state is _State.ESTABLISHED and self._channels is not None:
            self._channels.setupBytesReceived(data)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        log.warn(
            "{conn!r}: no connection request within {t} s; dropping it",
            conn=self,
            t=self.service.handshakeTimeout,
        )
        self._teardown("handshake timed out")

    def _handshake(self, data: bytes) -> None:
        if self._handshakeTimer is not None:
            self._handshakeTimer.cancel()
            self._handshakeTimer = None
        service = self.service
        try:
            request = ConnectionRequest.decode(data)
        except MalformedMessage as e:
            # libqb closes such a connection without an answer.
            log.error("{conn!r}: bad connection request: {why}", conn=self, why=e.reason)
            self._teardown("bad connection request")
            return
        try:
            self.maxMessageSize = negotiateMaxMessageSize(
                request.maxMessageSize, service.enforceBufferSize, service.maxMessageSizeCeiling
            )
        except MalformedMessage as e:
            self._refuse(e.errno, e.reason)
            return
        pid, uid, gid = self.credentials
        try:
            self._directory = PrivateDirectory.create(
                descriptionTemplate(os.getpid(), pid, self._fd), uid, gid, service.shmDirectory
            )
        except OSError as e:
            self._refuse(e.errno or errno.EIO, f"cannot create its directory: {e}")
            return
        self.description = os.path.join(self._directory.path, "qb")
        code = self._askAccept(uid, gid)
        if code:
            self._refuse(code, "refused by the service")
            return
        authUid, authGid, mode = self._auth
        self._directory.chown(authUid, authGid)
        channels = ServerShmChannels if service.transport == TRANSPORT_SHM else ServerSocketChannels
        try:
            self._channels = channels(
                self._reactor,
                self._transport,
                self._directory,
                service.name,
                self.maxMessageSize,
                authUid,
                authGid,
                mode,
                self._requestReceived,
                self._channelFailed,
            )
        except OSError as e:
            self._refuse(e.errno or errno.EIO, f"cannot create its transport: {e}")
            return
        request_, response, event = self._channels.strings
        self._transport.write(
            ConnectionResponse(
                0,
                self._channels.transportType,
                self.maxMessageSize,
                request_,
                response,
                event,
                id(self),
            ).encode()
        )
        self._state = _State.ESTABLISHED
        service._established(self)
        self._applyRateLimit(service.rateLimit)
        log.info(
            "{conn!r}: connected, {size}-byte messages, {desc}",
            conn=self,
            size=self.maxMessageSize,
            desc=self.description,
        )
        try:
            service.handlers.connectionCreated(self)
        except Exception:
            log.failure("{conn!r}: connectionCreated failed", conn=self)

    def _askAccept(self, uid: int, gid: int) -> int:
        self._askedAccept = True
        try:
            result = self.service.handlers.connectionAccepted(self, uid, gid)
        except QBError as e:
            return e.errno
        except Exception:
            log.failure("{conn!r}: connectionAccepted failed; refusing", conn=self)
            return errno.EIO
        if result is None or result is True:
            return 0
        if result is False:
            return errno.EACCES
        return abs(int(result))

    def _refuse(self, code: int, why: str) -> None:
        log.warn(
            "{conn!r}: refused with {name}: {why}",
            conn=self,
            name=errno.errorcode.get(code, str(code)),
            why=why,
        )
        self._transport.write(ConnectionResponse.refusal(code).encode())
        self._state = _State.CLOSING
        # loseConnection writes the refusal first; _setupLost then finishes.
        self._transport.loseConnection()  # type: ignore[no-untyped-call]
        self._finish()

    # Requests

    def _requestReceived(self, data: Buffer) -> None:
        if self._state is not _State.ESTABLISHED:
            return
        zeroCopy = self.service.zeroCopy
        try:
            msg = decodeRequest(data, self.maxMessageSize, copy=not zeroCopy)
        except MalformedMessage as e:
            self._protocolError(e.reason)
            return
        msgId = msg.id
        if msgId == MSG_DISCONNECT:
            log.info("{conn!r}: client asked to disconnect", conn=self)
            self._teardown("client sent QB_IPC_MSG_DISCONNECT")
            return
        if msgId in (MSG_AUTHENTICATE, MSG_NEW_EVENT_SOCK):
            self._protocolError(f"request uses reserved id {msgId}")
            return
        self._stats.requests += 1
        if zeroCopy:
            payload: Any = msg.payload  # a memoryview (see listen)
            try:
                self._dispatch(msgId, payload)
            finally:
                payload.release()
        else:
            self._dispatch(msgId, msg.payload)

    def _protocolError(self, why: str) -> None:
        log.error("{conn!r}: {why}; dropping the connection", conn=self, why=why)
        self._teardown(why)

    def _dispatch(self, msgId: int, payload: bytes) -> None:
        try:
            result = self.service.handlers.messageReceived(self, msgId, payload)
        except Exception:
            result = Failure()
        # The common answers skip the attribute look-up and the isinstance
        # (Deferred is an Awaitable: isinstance goes through ABCMeta).
        if type(result) not in _PLAIN_RESULTS:
            if hasattr(result, "__await__") and not isinstance(result, Deferred):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                slot = _ReplySlot(msgId)
                self._replySlots.append(slot)
                result.addBoth(self._replyReady, slot)
                return
        if self._replySlots:
            # It waits behind earlier answers: it must outlive a zero-copy
            # request's view.
            slot = _ReplySlot(msgId)
            slot.ready, slot.result = True, _owned(result)
            self._replySlots.append(slot)
        else:
            self._reply(msgId, result)

    def _replyReady(self, result: Any, slot: _ReplySlot) -> None:
        slot.ready, slot.result = True, result
        slots = self._replySlots
        while slots and slots[0].ready:
            done = slots.popleft()
            self._reply(done.msgId, done.result)

    def _reply(self, msgId: int, result: Any) -> None:
        if self._state is not _State.ESTABLISHED and isinstance(result, Failure):
            log.failure("{conn!r}: handler failed", result, conn=self)
            return
        if result is None or self._state is not _State.ESTABLISHED:
            return
        d: Optional[Deferred[None]]
        if type(result) is bytes:
            d = self._transmit(msgId, result, 0, True)
        elif isinstance(result, Failure):
            if isinstance(result.value, QBError):
                code = result.value.errno
            else:
                log.failure("{conn!r}: handler for id {id} failed", result, conn=self, id=msgId)
                code = errno.EIO
            d = self._transmit(msgId, b"", -code, True)
        elif isinstance(result, Message):
            d = self._transmit(result.id, result.payload, result.error, True)
        elif isinstance(result, (bytes, bytearray, memoryview)):
            # Written from where it is (a zero-copy request's view is still
            # valid here); a channel that must hold it copies it first.
            d = self._transmit(msgId, result, 0, True)
        else:
            log.error(
                "{conn!r}: handler for id {id} returned {r!r}; answering -EIO",
                conn=self,
                id=msgId,
                r=result,
            )
            d = self._transmit(msgId, b"", -errno.EIO, True)
        if d is not None:
            d.addErrback(self._replyFailed, msgId)

    def _replyFailed(self, reason: Failure, msgId: int) -> None:
        if reason.check(MessageTooLargeError):
            # The client still waits for an answer to this request, and
            # every later response pairs by order: answer -EMSGSIZE.
            log.error("{conn!r}: answer to id {id}: {e}", conn=self, id=msgId, e=reason.value)
            self.respond(msgId, b"", -errno.EMSGSIZE).addErrback(self._replyFailed, msgId)
        elif not reason.check(ConnectionLostError):
            log.failure("{conn!r}: reply to id {id} failed", reason, conn=self, id=msgId)

    # Flow control

    def _applyRateLimit(self, rate: int) -> None:
        channels = self._channels
        if channels is None or self._state is not _State.ESTABLISHED:
            return
        fc = _FLOW_CONTROL.get(rate, 0)
        if fc != self._stats.flowControlState:
            channels.setFlowControl(fc)
            self._stats.flowControlState = fc
            self._stats.flowControlCount += 1
        channels.batch = _BATCH[rate]
        if fc:
            channels.stopReading()
        else:
            channels.startReading()

    # Teardown

    def _setupLost(self, reason: Failure) -> None:
        if self._state in (_State.HANDSHAKE, _State.ESTABLISHED):
            self._teardown("client closed the connection")

    def _channelFailed(self, error: BaseException) -> None:
        if self._state is _State.ESTABLISHED:
            log.warn("{conn!r}: transport failed: {e}", conn=self, e=error)
        self._teardown(f"transport failed: {error}")

    def _teardown(self, why: str) -> None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        wasEstablished = self._state is _State.ESTABLISHED
        self._state = _State.CLOSING
        if self._handshakeTimer is not None:
            self._handshakeTimer.cancel()
            self._handshakeTimer = None
        self._transport.abortConnection()
        if self._channels is not None:
            self._channels.close(ConnectionLostError(f"{self!r}: {why}"))
        self.service._unestablished(self)
        log.info("{conn!r}: closing: {why}", conn=self, why=why)
        if wasEstablished:
            self._runClosed()
        else:
            self._finish()

    def _runClosed(self) -> None:
        self._closedRetry = None
        try:
            result = self.service.handlers.connectionClosed(self)
        except Exception:
            log.failure("{conn!r}: connectionClosed failed", conn=self)
            result = None
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: log.failure("{conn!r}: connectionClosed failed", f, conn=self)
            )
            result.addBoth(lambda _: self._finish())
        elif isinstance(result, int) and result != 0:
            self._closedRetry = self._clock.callLater(_CLOSED_RETRY_INTERVAL, self._runClosed)
        else:
            self._finish()

    def _finish(self) -> None:
        if self._state is _State.CLOSED:
            return
        if self._askedAccept:
            # libqb calls destroyed for every connection it asked about,
            # refused ones included, so that accept's allocations go.
            try:
                self.service.handlers.connectionDestroyed(self)
            except Exception:
                log.failure("{conn!r}: connectionDestroyed failed", conn=self)
        if self._directory is not None:
            self._directory.remove()
        self._state = _State.CLOSED
        self.service._gone(self)
        waiters, self._closedWaiters = self._closedWaiters, []
        for d in waiters:
            d.callback(None)


@implementer(IReadDescriptor)
class _Listener:
    """The listening setup socket: accepts in bounded batches."""

    def __init__(self, service: Service, sock: socket.socket, batch: int = 16) -> None:
        self._service = service
        self._sock = sock
        self._fd = sock.fileno()
        self._batch = batch

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"qb-listen {self._service.name}"

    def doRead(self) -> None:
        for _ in range(self._batch):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: the pending client stays in the
                # backlog; log and try again on the next wake-up.
                log.error("{svc}: accept failed: {e}", svc=self._service.name, e=e)
                return
            sock.setblocking(False)
            self._service._accepted(sock)

    def connectionLost(self, reason: Failure) -> None:
        log.error("{svc}: listener lost: {r}", svc=self._service.name, r=reason.value)

    def close(self) -> None:
        self._fd = -1
        self._sock.close()


class Service:
    """
    A listening libqb service (``qb_ipcs_service_t``).

    Made by L{listen}; stopped with L{stopListening}.

    @ivar context: free for the service's own state
        (``qb_ipcs_service_context_set``).
    @ivar connections: the established connections, oldest first.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        name: str,
        handlers: IServiceHandlers,
        transport: int,
        serviceId: int,
        enforceBufferSize: int,
        maxMessageSizeCeiling: int,
        filesystemSockets: bool,
        socketDirectory: str,
        shmDirectory: str,
        handshakeTimeout: float,
        zeroCopy: bool = False,
    ) -> None:
        if transport not in (TRANSPORT_SOCKET, TRANSPORT_SHM):
            raise ValueError(f"unknown transport type {transport}")
        if enforceBufferSize > maxMessageSizeCeiling:
            raise ValueError(
                f"enforced buffer size {enforceBufferSize} exceeds the ceiling"
                f" {maxMessageSizeCeiling}"
            )
        self._reactor = reactor
        self.name = name
        self.handlers = handlers
        self.transport = transport
        self.serviceId = serviceId
        self.enforceBufferSize = enforceBufferSize
        self.maxMessageSizeCeiling = maxMessageSizeCeiling
        self.filesystemSockets = filesystemSockets
        self.shmDirectory = shmDirectory
        self.handshakeTimeout = handshakeTimeout
        self.zeroCopy = zeroCopy
        self.rateLimit = RATE_NORMAL
        self.context: Any = None
        self.address = serviceAddress(name, filesystemSockets, socketDirectory)
        self._pending: Set[ServerConnection] = set()
        self._connections: Dict[ServerConnection, None] = {}
        self._closedCount = 0
        self._listener: Optional[_Listener] = None
        self._stopping: Optional[Deferred[None]] = None
        self._socketInode: Optional[int] = None

    @property
    def connections(self) -> List[ServerConnection]:
        """The established connections, oldest first."""
        return list(self._connections)

    @property
    def closedConnections(self) -> int:
        """Established connections closed so far (see L{stats})."""
        return self._closedCount

    def stats(self, clearAfterRead: bool = False) -> ServiceStats:
        """
        The service's counters (``qb_ipcs_stats_get``).

        @param clearAfterRead: reset the closed-connection count after
            reading it.  (libqb also zeroes its active count, which then
            wraps below zero as those connections close; txqb counts the
            live connections instead, so that number is always right.)
        """
        result = ServiceStats(len(self._connections), self._closedCount)
        if clearAfterRead:
            self._closedCount = 0
        return result

    def startListening(self) -> None:
        """Bind the service name and start accepting clients."""
        sock = streamListener(self.address, self.filesystemSockets)
        if self.filesystemSockets:
            self._socketInode = os.stat(self.address).st_ino
        self._listener = _Listener(self, sock)
        self._reactor.addReader(self._listener)
        log.info(
            "{svc}: listening at {where} ({kind})",
            svc=self.name,
            where=os.fsdecode(self.address).replace("\0", "@", 1).rstrip("\0"),
            kind="shm transport" if self.transport == TRANSPORT_SHM else "socket transport",
        )

    def requestRateLimit(self, rate: int) -> None:
        """
        Change how requests are read (``qb_ipcs_request_rate_limit``).

        L{RATE_OFF} and L{RATE_OFF_2} stop reading requests and raise every
        client's flow-control word to 1 or 2; any other rate turns it off
        again.  New connections start with the service's current state.
        """
        if rate not in (RATE_FAST, RATE_NORMAL, RATE_SLOW, RATE_OFF, RATE_OFF_2):
            raise ValueError(f"unknown rate limit {rate}")
        self.rateLimit = rate
        for conn in self._connections:
            conn._applyRateLimit(rate)

    def stopListening(self) -> Deferred[None]:
        """
        Stop accepting, disconnect every client and remove every file the
        service made (``qb_ipcs_destroy``).

        @return: a L{Deferred} that fires when every connection is gone.
        """
        if self._stopping is not None:
            return self._stopping
        if self._listener is not None:
            self._reactor.removeReader(self._listener)
            self._listener.close()
            self._listener = None
            if self.filesystemSockets:
                self._unlinkSocket()
        conns = list(self._pending) + list(self._connections)
        waits = [conn.whenClosed() for conn in conns]
        for conn in conns:
            conn.disconnect()
        d: Deferred[Any] = DeferredList(waits)
        self._stopping = d.addCallback(lambda _: None)
        return self._stopping

    def _unlinkSocket(self) -> None:
        # Remove the socket only if it is still the one we bound: another
        # server may have replaced it since.
        try:
            if os.stat(self.address).st_ino == self._socketInode:
                os.unlink(self.address)
        except OSError:
            pass

    def _accepted(self, sock: socket.socket) -> None:
        try:
            credentials = peerCredentials(sock)
        except OSError as e:
            log.error("{svc}: no peer credentials: {e}", svc=self.name, e=e)
            sock.close()
            return
        self._pending.add(ServerConnection(self, sock, credentials))

    def _established(self, conn: ServerConnection) -> None:
        self._pending.discard(conn)
        self._connections[conn] = None

    def _unestablished(self, conn: ServerConnection) -> None:
        self._pending.discard(conn)
        if self._connections.pop(conn, 0) is None:
            self._closedCount += 1

    def _gone(self, conn: ServerConnection) -> None:
        self._pending.discard(conn)


def listen(
    reactor: IReactorFDSet,
    name: str,
    handlers: IServiceHandlers,
    transport: str | int = "socket",
    serviceId: int = 0,
    enforceBufferSize: int = 0,
    maxMessageSizeCeiling: int = DEFAULT_MAX_MESSAGE_SIZE_CEILING,
    filesystemSockets: Optional[bool] = None,
    socketDirectory: str = DEFAULT_SOCKET_DIR,
    shmDirectory: str = SHM_DIR,
    handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    zeroCopy: bool = False,
) -> Service:
    """
    Create and start a libqb service (``qb_ipcs_create`` + ``qb_ipcs_run``).

    @param reactor: any reactor providing L{IReactorFDSet} and
        L{IReactorTime}.
    @param name: the service name clients connect to.
    @param handlers: the service's L{IServiceHandlers}.
    @param transport: ``"socket"`` (``QB_IPC_SOCKET``) or ``"shm"``.
    @param serviceId: libqb's integer service id, for the service's use.
    @param enforceBufferSize: a floor on every connection's message size
        (``qb_ipcs_enforce_buffer_size``).
    @param maxMessageSizeCeiling: the largest size granted; larger wishes
        are refused with ``EMSGSIZE``.
    @param filesystemSockets: use a filesystem setup socket in
        C{socketDirectory}; by default, as libqb decides: when
        C{/etc/libqb/force-filesystem-sockets} exists.
    @param socketDirectory: where a filesystem setup socket goes (Debian's
        libqb: C{/tmp}).
    @param shmDirectory: where each connection's private directory is
        made (C{/dev/shm}).
    @param handshakeTimeout: seconds a new client may stay silent before
        it is dropped.
    @param zeroCopy: hand C{messageReceived} its payload as a
        C{memoryview} straight into the request's shared-memory ring (SHM)
        or the receive buffer (socket), instead of a copy.  The view is
        released when the handler returns: copy (C{bytes(payload)}) what
        must outlive the call, including anything an C{async def} handler
        reads after its first C{await}.  Returning the view itself, or a
        L{Message} holding it, is fine.
    @return: the running L{Service}.
    @raise OSError: the name could not be bound (``EADDRINUSE``: another
        server has it).
    """
    if isinstance(transport, str):
        transport = transportFromName(transport)
    service = Service(
        reactor,
        name,
        handlers,
        transport,
        serviceId,
        enforceBufferSize,
        maxMessageSizeCeiling,
        filesystemSocketsForced() if filesystemSockets is None else filesystemSockets,
        socketDirectory,
        shmDirectory,
        handshakeTimeout,
        zeroCopy,
    )
    service.startListening()
    return service
