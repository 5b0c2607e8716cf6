"""
txqb: libqb's client/server IPC for Twisted, in pure Python.

Wire-compatible with C libqb 2.x: a txqb client talks to libqb daemons
(corosync, pacemaker, ...), and C libqb clients talk to txqb servers.

The names below are imported on first use, so that ``import
txqb.blocking`` (a command-line client, say) does not pay for importing
Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

from txqb._version import __version__

if TYPE_CHECKING:
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

_WHERE: Dict[str, str] = {
    "Message": "txqb._wire.headers",
    "connect": "txqb.client",
    "Client": "txqb.client",
    "EventStream": "txqb.client",
    "ClientStats": "txqb.client",
    "ConnectionStats": "txqb.server",
    "ServiceStats": "txqb.server",
    "listen": "txqb.server",
    "Service": "txqb.server",
    "ServiceHandlers": "txqb.server",
    "ServerConnection": "txqb.server",
    "IServiceHandlers": "txqb.interfaces",
    "RATE_FAST": "txqb.server",
    "RATE_NORMAL": "txqb.server",
    "RATE_SLOW": "txqb.server",
    "RATE_OFF": "txqb.server",
    "RATE_OFF_2": "txqb.server",
    "QBError": "txqb.errors",
    "RefusedError": "txqb.errors",
    "ServiceNotFoundError": "txqb.errors",
    "ConnectionLostError": "txqb.errors",
    "MessageTooLargeError": "txqb.errors",
    "ProtocolError": "txqb.errors",
    "QBTimeoutError": "txqb.errors",
}

__all__ = [
    "__version__",
    "Message",
    "connect",
    "Client",
    "EventStream",
    "listen",
    "Service",
    "ServiceHandlers",
    "ServerConnection",
    "ClientStats",
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


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used."""
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'txqb' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    """Every public name, imported or not yet."""
    return sorted(set(globals()) | set(__all__))
