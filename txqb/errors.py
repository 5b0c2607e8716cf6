"""
txqb's exceptions.

libqb reports every failure as a negative errno.  Each txqb exception
carries that errno (``.errno``) so that code ported from C can keep its
checks, and a sentence saying what happened (``str(exc)``).
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "QBError",
    "RefusedError",
    "ServiceNotFoundError",
    "ConnectionLostError",
    "MessageTooLargeError",
    "ProtocolError",
    "QBTimeoutError",
]


class QBError(Exception):
    """
    Base class of txqb's errors: a libqb errno plus an explanation.

    @ivar errno: the positive errno value; libqb's C API returns its
        negative.
    """

    defaultErrno = _errno.EIO

    def __init__(self, message: str, code: int | None = None) -> None:
        self.errno = abs(code) if code is not None else self.defaultErrno
        super().__init__(message)

    def __repr__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{type(self).__name__}({name}: {self})"


class RefusedError(QBError):
    """
    The server refused the connection in its handshake.

    ``errno`` is what the server's accept policy returned (``EACCES`` is
    libqb's convention for "not allowed").
    """

    defaultErrno = _errno.EACCES

    @classmethod
    def fromResponse(cls, name: str, error: int) -> RefusedError:
        """Build the error for service ``name`` refusing with ``-errno``."""
        code = abs(error)
        return cls(
            f"service {name!r} refused the connection: {os.strerror(code)}", code
        )


class ServiceNotFoundError(QBError):
    """Nothing listens on the service's setup socket."""

    defaultErrno = _errno.ECONNREFUSED


class ConnectionLostError(QBError):
    """
    The connection is gone: the peer closed it, died, or broke the protocol.

    Every request, send and event wait outstanding at that moment fails with
    this error.
    """

    defaultErrno = _errno.ENOTCONN


class MessageTooLargeError(QBError):
    """A message exceeds the connection's negotiated size; nothing was sent."""

    defaultErrno = _errno.EMSGSIZE


class ProtocolError(QBError):
    """The peer sent something that is not libqb's protocol."""

    defaultErrno = _errno.EBADMSG


class QBTimeoutError(QBError):
    """A connect, handshake or request did not complete in time."""

    defaultErrno = _errno.ETIMEDOUT
