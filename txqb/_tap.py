"""
``twistd qbipc``: run libqb-compatible services under twistd.

Example::

    twistd -n qbipc --service echo --transport socket
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.python import usage

from txqb._wire.naming import validateServiceName
from txqb.interfaces import IServiceHandlers
from txqb.server import DEFAULT_MAX_MESSAGE_SIZE_CEILING, transportFromName

__all__ = ["Options", "makeService", "QBIPCService", "BUILTIN_SERVICES"]


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


class Options(usage.Options):
    """Command-line options of ``twistd qbipc``."""

    synopsis = "[options]"
    longdesc = (
        "Serve libqb IPC services that C libqb clients (qb_ipcc_connect) and"
        " txqb clients can use.  Built-in services: "
        + ", ".join(sorted(BUILTIN_SERVICES))
        + "."
    )
    optParameters: List[List[Any]] = [
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

    def opt_service(self, spec: str) -> None:
        """
        A service to run (repeatable): a built-in service, served under its
        own name or, as KIND=NAME, under the libqb name NAME.
        """
        kind, _, name = spec.partition("=")
        if kind not in BUILTIN_SERVICES:
            raise usage.UsageError(
                f"unknown service {kind!r}; built-in services: "
                + ", ".join(sorted(BUILTIN_SERVICES))
            )
        name = name or kind
        try:
            validateServiceName(name)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["services"].append((kind, name))

    opt_s = opt_service

    def postOptions(self) -> None:
        """Check the combination of options."""
        if not self["services"]:
            raise usage.UsageError("name at least one --service")
        try:
            transportFromName(self["transport"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        ceiling, size = self["max-message-ceiling"], self["max-message-size"]
        if size is not None and size > ceiling:
            raise usage.UsageError(
                f"--max-message-size {size} exceeds --max-message-ceiling {ceiling}"
            )


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
    ) -> None:
        self.name = self.serviceName = name
        self.handlers = handlers
        self.transport = transport
        self.enforceBufferSize = enforceBufferSize
        self.maxMessageSizeCeiling = maxMessageSizeCeiling
        self._reactor = reactor
        self.service: Optional[Any] = None

    def startService(self) -> None:
        """Bind the service name."""
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

    def stopService(self) -> Optional[Deferred[None]]:
        """Stop listening and wait for every connection to be torn down."""
        super().stopService()  # type: ignore[no-untyped-call]
        # SIGTERM is how an init system stops a service, not a failure: let
        # twistd exit 0 instead of re-raising the signal at exit.
        reactor = self._reactor
        if reactor is not None and getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None
        service, self.service = self.service, None
        if service is None:
            return None
        result: Deferred[None] = service.stopListening()
        return result


def makeService(options: Options) -> IService:
    """Build the services named on the command line."""
    top = MultiService()
    for kind, name in options["services"]:
        QBIPCService(
            name,
            BUILTIN_SERVICES[kind](),
            transport=options["transport"],
            enforceBufferSize=options["max-message-size"] or 0,
            maxMessageSizeCeiling=options["max-message-ceiling"],
        ).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
