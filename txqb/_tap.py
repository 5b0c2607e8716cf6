"""
``twistd qbipc``: run libqb-compatible services under twistd.

Example::

    twistd -n qbipc --service echo --transport socket
    twistd -n qbipc --config /etc/txqb/services.toml

Each service also answers ``txqb stats NAME`` on a private unix socket
(see L{txqb._cli.STATS_PREFIX}); libqb clients never see it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._cli import STATS_PREFIX
from txqb._config import RATE_NAMES, ConfigError, ServiceConfig, loadConfig
from txqb._posix.sockets import peerCredentials
from txqb._wire.naming import validateServiceName
from txqb.errors import QBError
from txqb.interfaces import IServiceHandlers
from txqb.server import (
    DEFAULT_MAX_MESSAGE_SIZE_CEILING,
    ServerConnection,
    transportFromName,
)

__all__ = [
    "Options",
    "makeService",
    "QBIPCService",
    "BUILTIN_SERVICES",
    "serviceStats",
    "PolicyHandlers",
]

log = Logger(namespace="txqb.qbipc")


def _echo() -> IServiceHandlers:
    from txqb.echo import EchoHandlers

    return EchoHandlers()


BUILTIN_SERVICES: Dict[str, Callable[[], IServiceHandlers]] = {"echo": _echo}
"""Services ``--service`` knows by name."""



def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive number of bytes")
    return number


class _Planned(NamedTuple):
    name: str
    handlers: IServiceHandlers
    transport: str
    enforceBufferSize: int
    maxMessageSizeCeiling: int
    rateLimit: Optional[int]


class Options(usage.Options):
    """Command-line options of ``twistd qbipc``."""

    synopsis = "[options]"
    longdesc = (
        "Serve libqb IPC services that C libqb clients (qb_ipcc_connect) and"
        " txqb clients can use.  Built-in services: "
        + ", ".join(sorted(BUILTIN_SERVICES))
        + ".  With --config, services declared in the file too; without"
        " --service, every service the file declares runs."
    )
    optParameters: List[List[Any]] = [
        ["config", "c", None, "A TOML file declaring services (see the operator guide)."],
        ["transport", "t", "socket", "Transport: socket or shm."],
        [
            "max-message-size",
            "m",
            None,
            "Enforce at least this message size (bytes) on every connection.",
            _positive,
        ],
        [
            "max-message-ceiling",
            None,
            DEFAULT_MAX_MESSAGE_SIZE_CEILING,
            "Refuse clients asking for larger messages than this (bytes).",
            _positive,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["services"] = []
        self["planned"] = []

    def opt_service(self, spec: str) -> None:
        """
        A service to run (repeatable): a built-in service or one the
        --config file declares, served under its own name or, as
        KIND=NAME, under the libqb name NAME.
        """
        kind, _, name = spec.partition("=")
        if name:
            try:
                validateServiceName(name)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        self["services"].append((kind, name))

    opt_s = opt_service

    def postOptions(self) -> None:
        """Check the combination of options and prepare every service."""
        try:
            transportFromName(self["transport"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        ceiling, size = self["max-message-ceiling"], self["max-message-size"]
        if size is not None and size > ceiling:
            raise usage.UsageError(
                f"--max-message-size {size} exceeds --max-message-ceiling {ceiling}"
            )
        configured: Dict[str, ServiceConfig] = {}
        if self["config"] is not None:
            try:
                configured = loadConfig(self["config"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        wanted = self["services"] or [(key, "") for key in configured]
        if not wanted:
            raise usage.UsageError("name at least one --service, or give --config")
        for kind, name in wanted:
            if kind in configured:
                self["planned"].append(self._configured(configured[kind], name))
            elif kind in BUILTIN_SERVICES:
                self["planned"].append(
                    _Planned(
                        name or kind,
                        PolicyHandlers(BUILTIN_SERVICES[kind]()),
                        self["transport"],
                        size or 0,
                        ceiling,
                        None,
                    )
                )
            else:
                known = sorted(set(BUILTIN_SERVICES) | set(configured))
                raise usage.UsageError(f"unknown service {kind!r}; known services: {', '.join(known)}")
        names = [p.name for p in self["planned"]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise usage.UsageError(f"service name {duplicates[0]!r} is used twice")

    def _configured(self, config: ServiceConfig, name: str) -> _Planned:
        where = f"{self['config']}: services.{config.key}"
        try:
            handlers = config.factory(**config.handlerArgs)
        except Exception as e:
            raise usage.UsageError(
                " ".join(f"{where}: handler {config.handler} failed: {type(e).__name__}: {e}".split())
            ) from None
        if not IServiceHandlers.providedBy(handlers):
            raise usage.UsageError(
                f"{where}: handler {config.handler} made {type(handlers).__name__},"
                " which does not provide txqb.interfaces.IServiceHandlers"
            )
        size = config.maxMessageSize or self["max-message-size"] or 0
        return _Planned(
            name or config.name,
            PolicyHandlers(handlers, config),
            config.transport or self["transport"],
            size,
            max(self["max-message-ceiling"], size),
            None if config.rateLimit is None else RATE_NAMES.index(config.rateLimit),
        )


@implementer(IServiceHandlers)
class PolicyHandlers:
    """
    A configured service's handlers: the configured accept policy and file
    ownership around the service's own handlers, and a log line for each
    connection, refusal and error.
    """

    def __init__(self, inner: IServiceHandlers, config: Optional[ServiceConfig] = None) -> None:
        self.inner = inner
        self.config = config

    def connectionAccepted(self, connection: ServerConnection, uid: int, gid: int) -> Any:
        """Refuse clients the configuration does not allow, then ask the service."""
        pid = connection.credentials.pid
        config = self.config
        if config is not None and not config.allows(uid, gid):
            log.warn(
                "{svc}: refused pid {pid} uid {uid} gid {gid}: not in allowed-uids/allowed-gids",
                svc=connection.service.name, pid=pid, uid=uid, gid=gid,
            )
            return -errno.EACCES
        if config is not None and (config.fileOwner, config.fileGroup, config.fileMode) != (None, None, None):
            connection.setAuth(
                uid if config.fileOwner is None else config.fileOwner,
                gid if config.fileGroup is None else config.fileGroup,
                0o600 if config.fileMode is None else config.fileMode,
            )
        result = self.inner.connectionAccepted(connection, uid, gid)
        if result not in (None, True, 0):
            log.warn(
                "{svc}: the handler refused pid {pid} uid {uid} gid {gid}: {result!r}",
                svc=connection.service.name, pid=pid, uid=uid, gid=gid, result=result,
            )
        else:
            log.info(
                "{svc}: connection from pid {pid} uid {uid} gid {gid}",
                svc=connection.service.name, pid=pid, uid=uid, gid=gid,
            )
        return result

    def connectionCreated(self, connection: ServerConnection) -> None:
        """Pass on."""
        self.inner.connectionCreated(connection)

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        """Pass on, logging the errors the server answers without a log line."""
        try:
            result = self.inner.messageReceived(connection, msgId, payload)
        except QBError as e:
            self._logError(connection, msgId, e)
            raise
        if isinstance(result, Deferred):
            result.addErrback(self._failed, connection, msgId)
        return result

    def _failed(self, reason: Failure, connection: ServerConnection, msgId: int) -> Failure:
        if isinstance(reason.value, QBError):
            self._logError(connection, msgId, reason.value)
        return reason

    def _logError(self, connection: ServerConnection, msgId: int, error: QBError) -> None:
        log.warn(
            "{conn!r}: request {id} answered with errno {code}: {error}",
            conn=connection, id=msgId, code=error.errno, error=error,
        )

    def connectionClosed(self, connection: ServerConnection) -> Any:
        """Pass on."""
        return self.inner.connectionClosed(connection)

    def connectionDestroyed(self, connection: ServerConnection) -> None:
        """Pass on."""
        self.inner.connectionDestroyed(connection)


def _connectionStats(connection: ServerConnection) -> Dict[str, Any]:
    pid, uid, gid = connection.credentials
    return {
        "pid": pid,
        "uid": uid,
        "gid": gid,
        "maxMessageSize": connection.maxMessageSize,
        **dataclasses.asdict(connection.stats()),
    }


def serviceStats(service: Any) -> Dict[str, Any]:
    """
    What ``txqb stats`` shows for a running L{txqb.server.Service}: its
    connections' counters and how many connections have closed.  The one
    place that reads a service's statistics.
    """
    return {
        "service": service.name,
        "pid": os.getpid(),
        "transport": "shm" if service.transport == 1 else "socket",
        "rateLimit": RATE_NAMES[service.rateLimit],
        **dataclasses.asdict(service.stats()),
        "connections": [_connectionStats(c) for c in service.connections],
    }


class _StatsProtocol(Protocol):
    def __init__(self, owner: QBIPCService) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        transport: Any = self.transport
        try:
            uid = peerCredentials(transport.socket).uid
        except OSError:
            uid = -1
        service = self.owner.service
        if uid not in (0, os.getuid()):
            body: Dict[str, Any] = {"error": "permission denied"}
        elif service is None:
            body = {"error": "service is stopping"}
        else:
            body = serviceStats(service)
        transport.write(json.dumps(body).encode() + b"\n")
        transport.loseConnection()


class QBIPCService(Service):
    """
    One libqb service as a Twisted application service: listening while
    running; on stop, every client is disconnected and every file removed.
    """

    def __init__(
        self,
        name: str,
        handlers: IServiceHandlers,
        transport: str = "socket",
        enforceBufferSize: int = 0,
        maxMessageSizeCeiling: int = DEFAULT_MAX_MESSAGE_SIZE_CEILING,
        reactor: Optional[Any] = None,
        rateLimit: Optional[int] = None,
        publishStats: bool = True,
    ) -> None:
        self.name = self.serviceName = name
        self.handlers = handlers
        self.transport = transport
        self.enforceBufferSize = enforceBufferSize
        self.maxMessageSizeCeiling = maxMessageSizeCeiling
        self.rateLimit = rateLimit
        self.publishStats = publishStats
        self._reactor = reactor
        self.service: Optional[Any] = None
        self._statsPort: Optional[Any] = None

    def startService(self) -> None:
        """Bind the service name (and its statistics socket)."""
        from txqb.server import listen

        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        super().startService()  # type: ignore[no-untyped-call]
        self.service = listen(
            self._reactor,
            self.serviceName,
            self.handlers,
            transport=self.transport,
            enforceBufferSize=self.enforceBufferSize,
            maxMessageSizeCeiling=self.maxMessageSizeCeiling,
        )
        if self.rateLimit is not None:
            self.service.requestRateLimit(self.rateLimit)
        if self.publishStats:
            factory = Factory.forProtocol(lambda: _StatsProtocol(self))  # type: ignore[no-untyped-call]
            address = (STATS_PREFIX + self.serviceName.encode()).decode()
            try:
                unixReactor: Any = self._reactor
                self._statsPort = unixReactor.listenUNIX(address, factory)
            except Exception as e:
                log.warn("{svc}: no statistics socket: {e}", svc=self.serviceName, e=e)

    def stopService(self) -> Optional[Deferred[None]]:
        """Stop listening and wait for every connection to be torn down."""
        super().stopService()  # type: ignore[no-untyped-call]
        # SIGTERM is how an init system stops a service, not a failure: let
        # twistd exit 0 instead of re-raising the signal at exit.
        reactor = self._reactor
        if reactor is not None and getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None
        waits: List[Deferred[Any]] = []
        port, self._statsPort = self._statsPort, None
        if port is not None:
            stopped = port.stopListening()
            if isinstance(stopped, Deferred):
                waits.append(stopped)
        service, self.service = self.service, None
        if service is not None:
            waits.append(service.stopListening())
        if not waits:
            return None
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)


def makeService(options: Options) -> IService:
    """Build the services the command line and the configuration name."""
    top = MultiService()
    for planned in options["planned"]:
        QBIPCService(
            planned.name,
            planned.handlers,
            transport=planned.transport,
            enforceBufferSize=planned.enforceBufferSize,
            maxMessageSizeCeiling=planned.maxMessageSizeCeiling,
            rateLimit=planned.rateLimit,
        ).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
