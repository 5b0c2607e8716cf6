"""
txqb: libqb's client/server IPC for Twisted, in pure Python.

Wire-compatible with C libqb 2.x: a txqb client talks to libqb daemons
(corosync, pacemaker, ...), and C libqb clients talk to txqb servers.
"""

from txqb._version import __version__
from txqb._wire.headers import Message
from txqb.client import Client, ClientStats, EventStream, connect
from txqb.errors import (
    ConnectionLostError,
    MessageTooLargeError,
    ProtocolError,
    QBError,
    QBTimeoutError,
    RefusedError,
    ServiceNotFoundError,
)
from txqb.interfaces import IServiceHandlers
from txqb.server import (
    RATE_FAST,
    RATE_NORMAL,
    RATE_OFF,
    RATE_OFF_2,
    RATE_SLOW,
    ConnectionStats,
    ServerConnection,
    Service,
    ServiceHandlers,
    ServiceStats,
    listen,
)

__all__ = [
    "__version__",
    "Message",
    "connect",
    "Client",
    "ClientStats",
    "EventStream",
    "listen",
    "Service",
    "ServiceHandlers",
    "ServerConnection",
    "ConnectionStats",
    "ServiceStats",
    "IServiceHandlers",
    "RATE_FAST",
    "RATE_NORMAL",
    "RATE_SLOW",
    "RATE_OFF",
    "RATE_OFF_2",
    "QBError",
    "RefusedError",
    "ServiceNotFoundError",
    "ConnectionLostError",
    "MessageTooLargeError",
    "ProtocolError",
    "QBTimeoutError",
]
