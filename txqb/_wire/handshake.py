"""
The libqb connection handshake on the setup socket, as bytes.

The client sends a 24-byte connection request (id -1, its wished
``max_msg_size``); the server answers with one 12328-byte connection
response that carries an error (0 or ``-errno``), the transport type, the
negotiated size and three NUL-terminated 4096-byte strings naming the
transport objects.  Sizes and offsets are libqb 2.0.6's on x86-64.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple, Union

from txqb._wire.headers import MSG_AUTHENTICATE, MalformedMessage

__all__ = [
    "CONNECTION_REQUEST_SIZE",
    "CONNECTION_RESPONSE_SIZE",
    "MIN_CLIENT_MAX_MSG_SIZE",
    "PATH_FIELD_SIZE",
    "TRANSPORT_SOCKET",
    "TRANSPORT_SHM",
    "ConnectionRequest",
    "ConnectionResponse",
    "negotiateMaxMessageSize",
]

Buffer = Union[bytes, bytearray, memoryview]

TRANSPORT_SOCKET = 0
"""``QB_IPC_SOCKET``: datagram sockets plus a control file."""

TRANSPORT_SHM = 1
"""``QB_IPC_SHM``: three shared-memory rings."""

PATH_FIELD_SIZE = 4096
"""``PATH_MAX``: the size of each name field in the connection response."""

_REQUEST = struct.Struct("<i4xi4xI4x")
_RESPONSE_FIXED = struct.Struct("<i4xi4xi4xiIq")

CONNECTION_REQUEST_SIZE = _REQUEST.size  # 24
CONNECTION_RESPONSE_SIZE = _RESPONSE_FIXED.size + 3 * PATH_FIELD_SIZE  # 12328

MIN_CLIENT_MAX_MSG_SIZE = CONNECTION_RESPONSE_SIZE
"""
C clients never ask for less than the size of the connection response;
txqb clients follow suit so that a C server sizes its rings identically.
"""


class ConnectionRequest(NamedTuple):
    """The client's opening message: how large a message it wants to use."""

    maxMessageSize: int

    def encode(self) -> bytes:
        """The 24 bytes a libqb client sends, padding zeroed."""
        return _REQUEST.pack(
            MSG_AUTHENTICATE, CONNECTION_REQUEST_SIZE, self.maxMessageSize
        )

    @classmethod
    def decode(cls, data: Buffer) -> ConnectionRequest:
        """
        Parse a connection request.

        libqb's server checks only the id (the size field is ignored); txqb
        also checks the size, since a peer that gets it wrong is not libqb.

        @raise MalformedMessage: not a libqb connection request.
        """
        if len(data) != CONNECTION_REQUEST_SIZE:
            raise MalformedMessage(
                errno.EBADMSG,
                f"connection request is {len(data)} bytes,"
                f" not {CONNECTION_REQUEST_SIZE}",
            )
        msgId, size, maxSize = _REQUEST.unpack_from(data)
        if msgId != MSG_AUTHENTICATE:
            raise MalformedMessage(
                errno.EBADMSG,
                f"connection request has id {msgId}, not {MSG_AUTHENTICATE}",
            )
        if size != CONNECTION_REQUEST_SIZE:
            raise MalformedMessage(
                errno.EBADMSG, f"connection request declares size {size}"
            )
        return cls(maxSize)


def _encodePath(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) >= PATH_FIELD_SIZE or b"\0" in raw:
        raise ValueError(f"name {value!r} cannot be sent in a connection response")
    return raw.ljust(PATH_FIELD_SIZE, b"\0")


def _decodePath(data: Buffer, offset: int) -> str:
    field = bytes(data[offset : offset + PATH_FIELD_SIZE])
    end = field.find(b"\0")
    if end < 0:
        raise MalformedMessage(
            errno.EBADMSG, "connection response name is not NUL-terminated"
        )
    return field[:end].decode("utf-8", "surrogateescape")


class ConnectionResponse(NamedTuple):
    """
    The server's answer to a connection request.

    ``error`` is 0 when the connection is accepted; otherwise it is
    ``-errno`` and every other field is zero or empty, as libqb sends it.
    ``connection`` is the server's opaque pointer, ignored by libqb 2.x
    clients.
    """

    error: int
    transport: int
    maxMessageSize: int
    request: str
    response: str
    event: str
    connection: int = 0

    @classmethod
    def refusal(cls, code: int) -> ConnectionResponse:
        """A refusal carrying ``-code``, as libqb's server sends it."""
        return cls(-abs(code), 0, 0, "", "", "")

    def encode(self) -> bytes:
        """The 12328 bytes of the response, for one single write."""
        return (
            _RESPONSE_FIXED.pack(
                MSG_AUTHENTICATE,
                CONNECTION_RESPONSE_SIZE,
                self.error,
                self.transport,
                self.maxMessageSize,
                self.connection,
            )
            + _encodePath(self.request)
            + _encodePath(self.response)
            + _encodePath(self.event)
        )

    @classmethod
    def decode(cls, data: Buffer) -> ConnectionResponse:
        """
        Parse a connection response.

        @raise MalformedMessage: not a libqb connection response.
        """
        if len(data) != CONNECTION_RESPONSE_SIZE:
            raise MalformedMessage(
                errno.EBADMSG,
                f"connection response is {len(data)} bytes,"
                f" not {CONNECTION_RESPONSE_SIZE}",
            )
        msgId, size, error, transport, maxSize, connection = (
            _RESPONSE_FIXED.unpack_from(data)
        )
        if msgId != MSG_AUTHENTICATE or size != CONNECTION_RESPONSE_SIZE:
            raise MalformedMessage(
                errno.EBADMSG,
                f"connection response has id {msgId} and size {size}",
            )
        base = _RESPONSE_FIXED.size
        return cls(
            error,
            transport,
            maxSize,
            _decodePath(data, base),
            _decodePath(data, base + PATH_FIELD_SIZE),
            _decodePath(data, base + 2 * PATH_FIELD_SIZE),
            connection,
        )


def negotiateMaxMessageSize(requested: int, enforced: int, ceiling: int) -> int:
    """
    The size a server grants: the larger of the client's wish and the
    service's enforced floor, as libqb does.

    libqb grants anything; a request for 4 GiB makes it create gigabytes of
    rings.  txqb refuses wishes above ``ceiling`` instead.

    @raise MalformedMessage: with ``EMSGSIZE`` when the result exceeds
        ``ceiling``.
    """
    granted = max(requested, enforced)
    if granted > ceiling:
        raise MalformedMessage(
            errno.EMSGSIZE,
            f"client asked for {requested}-byte messages; this service allows"
            f" at most {ceiling}",
        )
    return granted
