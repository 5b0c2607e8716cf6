"""
A libqb client that stays connected: Twisted's C{ClientService} idiom for
libqb services.

A cluster daemon restarts (an upgrade, a fence, a crash), and its clients
are expected to come back on their own.  L{ReconnectingClientService}
connects, hands each new L{Client} to a C{prepareConnection} callable
(re-register, re-subscribe: whatever re-establishes the client's state,
its event stream included), and after a loss connects again with
Twisted's back-off.  It I{is} a L{twisted.application.internet.ClientService},
driven through L{QBClientEndpoint}, so its state machine, retry policy and
C{failAfterFailures} are Twisted's own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._wire.headers import Message
from txqb.client import Client, connect

__all__ = ["QBClientEndpoint", "ClientProtocol", "ReconnectingClientService"]


@implementer(IAddress)
class _ServiceAddress:
    """The address of a libqb service: its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<libqb service {self.name!r}>"


class _ClientTransport:
    """What L{ClientProtocol.transport} is: enough of one to end the client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def loseConnection(self) -> None:
        """Disconnect the client (C{ClientService.stopService} calls this)."""
        self.client.disconnect()

    abortConnection = loseConnection

    def getPeer(self) -> _ServiceAddress:
        """The service's name."""
        return _ServiceAddress(self.client.name)

    getHost = getPeer


class ClientProtocol(Protocol):
    """
    The protocol a L{QBClientEndpoint} connection makes: it holds the
    L{Client}, and its C{connectionLost} runs when the client is closed
    or lost.  Subclass it to act on those two moments.

    @ivar client: the connected L{Client}.
    """

    client: Client

    def connectionMade(self) -> None:
        """Take the client from the transport the endpoint made."""
        self.client = self.transport.client  # type: ignore[union-attr]


@implementer(IStreamClientEndpoint)
class QBClientEndpoint:
    """
    A client endpoint whose connections are libqb connections to one
    service, for Twisted machinery that speaks endpoints.

    @param connectOptions: passed to L{txqb.connect} (C{maxMessageSize},
        C{timeout}, C{eventReceived}, C{fcEnableMax}, ...).
    """

    def __init__(self, reactor: IReactorFDSet, name: str, **connectOptions: Any) -> None:
        self._reactor = reactor
        self.name = name
        self._options = connectOptions

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect, then build a protocol and connect it to a transport whose
        C{client} attribute is the L{Client} (L{ClientProtocol} takes it
        from there); the protocol's C{connectionLost} runs when the client
        goes.
        """
        d = connect(self._reactor, self.name, **self._options)
        return d.addCallback(self._connected, protocolFactory)

    def _connected(self, client: Client, protocolFactory: IProtocolFactory) -> IProtocol:
        protocol = protocolFactory.buildProtocol(_ServiceAddress(self.name))
        if protocol is None:
            client.disconnect()
            raise ConnectError(string=f"the factory refused a connection to {self.name!r}")
        protocol.makeConnection(_ClientTransport(client))  # type: ignore[arg-type]
        client.whenDisconnected().addCallback(
            lambda _: protocol.connectionLost(Failure(ConnectionDone()))
        )
        return protocol


class ReconnectingClientService(ClientService):
    """
    Keep a client connected to a libqb service, reconnecting after a loss.

    Start it with C{startService} (or as a child of a twistd application);
    L{whenConnected} gives the current L{Client}.

    @param name: the service name.
    @param eventReceived: called with every event of every connection in
        turn, so that one callback sees the whole stream across restarts.
    @param prepareConnection: called with each new L{Client} before
        L{whenConnected} hands it out; return a L{Deferred} to hold that
        until, for example, a subscription request is answered.  If it
        fails, the connection is dropped and retried.
    @param retryPolicy: seconds to wait before attempt I{n}; Twisted's
        jittered exponential back-off by default.
    @param connectOptions: more L{txqb.connect} options.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        name: str,
        eventReceived: Optional[Callable[[Message], None]] = None,
        prepareConnection: Optional[Callable[[Client], Any]] = None,
        retryPolicy: Optional[Callable[[int], float]] = None,
        **connectOptions: Any,
    ) -> None:
        endpoint = QBClientEndpoint(reactor, name, eventReceived=eventReceived, **connectOptions)
        prepare: Optional[Callable[[IProtocol], Deferred[object]]] = None
        if prepareConnection is not None:
            userPrepare = prepareConnection

            def prepareClient(protocol: IProtocol) -> Deferred[object]:
                client: Client = protocol.client  # type: ignore[attr-defined]
                result: Deferred[object] = maybeDeferred(userPrepare, client)
                return result

            prepare = prepareClient

        clock: IReactorTime = reactor  # type: ignore[assignment]
        super().__init__(
            endpoint,
            Factory.forProtocol(ClientProtocol),
            retryPolicy=retryPolicy,
            clock=clock,
            prepareConnection=prepare,
        )
        self.name = name
        self._clock = clock

    def whenConnected(self, failAfterFailures: Optional[int] = None) -> Deferred[Client]:  # type: ignore[override]
        """
        The connected L{Client}: at once if there is one, else when the
        next attempt succeeds.

        @param failAfterFailures: fail after this many failed attempts
            instead of waiting for ever.
        """
        d: Deferred[Any] = super().whenConnected(failAfterFailures=failAfterFailures)
        if not d.called:
            # Twisted fires it from inside its state machine, which must
            # not be re-entered (an awaiting caller that stops the service
            # at once would be): hand the result over on the next turn.
            d.addBoth(lambda result: deferLater(self._clock, 0, lambda: result))
        return d.addCallback(lambda protocol: protocol.client)
