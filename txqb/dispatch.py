"""
Routing requests by message id: a L{Dispatcher} per service, and
coroipc's 65 536 services x 65 536 commands on one libqb service through a
L{ServiceMultiplexer}.

libqb hands every request of a service to one ``msg_process`` callback and
leaves the ``switch`` on the id to the application; corosync's coroipc put
a selector in front of it, so that each (service, command) pair has its
own function.  These classes are that selector for txqb servers.  Both are
ordinary L{IServiceHandlers}: pass one to L{txqb.listen}.

Handlers are called as C{handler(connection, payload)} and may return what
L{IServiceHandlers.messageReceived} may: bytes or a L{Message} (the
response), L{None} (no response, or one sent later with
L{ServerConnection.respond}), a L{Deferred} or a coroutine (an C{async
def} handler) giving either.  Answers go out in request order whatever
order they are ready in.

An id nobody registered is answered with C{-EINVAL} by default: that is
what libqb's own servers, the C examples and txqb's L{ServiceHandlers} say
for a request they do not know, so moving a service onto a dispatcher
changes nothing its existing clients can see.  Both classes take another
errno for it.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from txqb._wire.headers import MSG_AUTHENTICATE, MSG_DISCONNECT, MSG_NEW_EVENT_SOCK, Message
from txqb.interfaces import IServiceHandlers
from txqb.server import ServerConnection, ServiceHandlers

__all__ = [
    "Dispatcher",
    "ServiceMultiplexer",
    "commandId",
    "splitCommandId",
    "RequestHandler",
    "MAX_SERVICES",
    "MAX_COMMANDS",
]

log = Logger(namespace="txqb.dispatch")

RequestHandler = Callable[[ServerConnection, bytes], Any]
"""C{handler(connection, payload) -> answer} (see the module docstring)."""

_F = TypeVar("_F", bound=RequestHandler)

MAX_SERVICES = 65536
"""Services a L{ServiceMultiplexer} can carry (numbers 0 ... 65535)."""

MAX_COMMANDS = 65536
"""Commands per multiplexed service (numbers 0 ... 65535)."""

_RESERVED = frozenset(
    m & 0xFFFFFFFF for m in (MSG_AUTHENTICATE, MSG_NEW_EVENT_SOCK, MSG_DISCONNECT)
)


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - 0x100000000 if value & 0x80000000 else value


def commandId(service: int, command: int) -> int:
    """
    The message id of C{command} of multiplexed service C{service}: the
    service in the high 16 bits, the command in the low 16, as the signed
    32-bit id libqb's headers carry.

    Three pairs are libqb's own control ids (-1, -2 and -3, i.e. service
    65535 with commands 65535, 65534 and 65533) and cannot be used.

    @raise ValueError: a number out of range, or a reserved pair.
    """
    if not 0 <= service < MAX_SERVICES:
        raise ValueError(f"service {service} out of range 0 ... {MAX_SERVICES - 1}")
    if not 0 <= command < MAX_COMMANDS:
        raise ValueError(f"command {command} out of range 0 ... {MAX_COMMANDS - 1}")
    raw = (service << 16) | command
    if raw in _RESERVED:
        raise ValueError(f"service {service} command {command} is a libqb control id")
    return _int32(raw)


def splitCommandId(msgId: int) -> Tuple[int, int]:
    """The (service, command) pair of a message id (see L{commandId})."""
    raw = msgId & 0xFFFFFFFF
    return raw >> 16, raw & 0xFFFF


def _answerUnknown(code: int, msgId: int) -> Message:
    return Message(msgId, -abs(code), b"")


@implementer(IServiceHandlers)
class Dispatcher(ServiceHandlers):
    """
    A service whose requests go to the handler registered for their id.

    Register with L{register} or the L{handler} decorator; subclass to
    override the connection callbacks (accept, created, closed, destroyed)
    as with L{ServiceHandlers}.

    @param unknownError: the errno answered (negated) for an id with no
        handler; see the module docstring.
    """

    def __init__(self, unknownError: int = errno.EINVAL) -> None:
        self.unknownError = unknownError
        self._handlers: Dict[int, RequestHandler] = {}

    def register(self, msgId: int, handler: RequestHandler) -> None:
        """
        Route requests with C{msgId} to C{handler}.  Within a
        L{ServiceMultiplexer}, C{msgId} is the command number.

        @raise ValueError: the id already has a handler, or is one of
            libqb's control ids.
        """
        key = _int32(msgId)
        if key & 0xFFFFFFFF in _RESERVED:
            raise ValueError(f"id {msgId} is a libqb control id")
        if key in self._handlers:
            raise ValueError(f"id {msgId} already has a handler")
        self._handlers[key] = handler

    def handler(self, msgId: int) -> Callable[[_F], _F]:
        """A decorator form of L{register}."""

        def decorate(function: _F) -> _F:
            self.register(msgId, function)
            return function

        return decorate

    def lookup(self, msgId: int) -> Optional[RequestHandler]:
        """The handler for C{msgId}, or L{None}."""
        return self._handlers.get(_int32(msgId))

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        """Call the id's handler, or answer C{-unknownError}."""
        return self.dispatchCommand(connection, msgId, msgId, payload)

    def dispatchCommand(
        self, connection: ServerConnection, command: int, msgId: int, payload: bytes
    ) -> Any:
        """
        Call C{command}'s handler for a request that arrived as C{msgId}
        (a L{ServiceMultiplexer} calls this); the answer keeps C{msgId}.
        """
        handler = self._handlers.get(command)
        if handler is None:
            return _answerUnknown(self.unknownError, msgId)
        return handler(connection, payload)


@implementer(IServiceHandlers)
class ServiceMultiplexer(ServiceHandlers):
    """
    Many services behind one libqb service name, coroipc's way: the high
    16 bits of a request id pick the service, the low 16 bits the command
    (see L{commandId}).

    Every registered service sees every connection's callbacks, as
    coroipc called each service's connect and disconnect functions:
    accept asks each in registration order and the first refusal wins;
    created, closed and destroyed go to each.  A closed callback that
    asks to be called again (a non-zero number) makes the whole close
    wait and retry, as in libqb; a L{Deferred} from any is waited for.

    @param unknownError: the errno answered (negated) for a request to a
        service number nobody registered.
    """

    def __init__(self, unknownError: int = errno.EINVAL) -> None:
        self.unknownError = unknownError
        self._services: Dict[int, Dispatcher] = {}
        self._closing: Dict[
            ServerConnection, Tuple[Dict[int, Dispatcher], List[Deferred[Any]]]
        ] = {}

    def register(self, service: int, dispatcher: Dispatcher) -> None:
        """
        Serve service number C{service} with C{dispatcher}, whose ids are
        command numbers.

        @raise ValueError: out of range, or taken.
        """
        if not 0 <= service < MAX_SERVICES:
            raise ValueError(f"service {service} out of range 0 ... {MAX_SERVICES - 1}")
        if service in self._services:
            raise ValueError(f"service {service} is already registered")
        self._services[service] = dispatcher

    def services(self) -> Dict[int, Dispatcher]:
        """The registered services by number (a copy)."""
        return dict(self._services)

    def connectionAccepted(self, connection: ServerConnection, uid: int, gid: int) -> int:
        """Ask every service; the first non-zero answer refuses."""
        for dispatcher in self._services.values():
            result = dispatcher.connectionAccepted(connection, uid, gid)
            if result not in (None, 0, True):
                return result
        return 0

    def connectionCreated(self, connection: ServerConnection) -> None:
        """Tell every service."""
        for dispatcher in self._services.values():
            try:
                dispatcher.connectionCreated(connection)
            except Exception:
                log.failure("{c!r}: connectionCreated failed", c=connection)

    def connectionClosed(self, connection: ServerConnection) -> Any:
        """
        Tell every service that has not yet agreed to the close; answer
        non-zero (call again) while any still asks to wait, then wait for
        the L{Deferred}s any of them returned.
        """
        state = self._closing.get(connection)
        if state is None:
            state = self._closing[connection] = (dict(self._services), [])
        pending, waits = state
        for number, dispatcher in list(pending.items()):
            result = dispatcher.connectionClosed(connection)
            if isinstance(result, int) and not isinstance(result, bool) and result != 0:
                continue
            del pending[number]
            if isinstance(result, Deferred):
                waits.append(result)
        if pending:
            return -errno.EAGAIN
        del self._closing[connection]
        if waits:
            return gatherResults(waits, consumeErrors=True)
        return None

    def connectionDestroyed(self, connection: ServerConnection) -> None:
        """Tell every service."""
        self._closing.pop(connection, None)
        for dispatcher in self._services.values():
            try:
                dispatcher.connectionDestroyed(connection)
            except Exception:
                log.failure("{c!r}: connectionDestroyed failed", c=connection)

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        """Route by the id's service half, then its command half."""
        service, command = splitCommandId(msgId)
        dispatcher = self._services.get(service)
        if dispatcher is None:
            return _answerUnknown(self.unknownError, msgId)
        return dispatcher.dispatchCommand(connection, command, msgId, payload)
