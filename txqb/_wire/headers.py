"""
libqb message headers, as bytes.

Every libqb message starts with a header whose fields are each aligned to
8 bytes (``__attribute__((aligned(8)))`` in ``qbipc_common.h``), so each
32-bit field is followed by 4 bytes of padding:

* request header, 16 bytes: ``id``, ``size``;
* response and event header, 24 bytes: ``id``, ``size``, ``error``.

``size`` always counts the header itself.  libqb never reads the padding;
txqb writes zeros there and ignores it on input.

This module is sans-IO: it knows nothing about sockets, rings or Twisted.
"""

from __future__ import annotations

import errno
import struct
from typing import List, NamedTuple, Tuple, Union

__all__ = [
    "REQUEST_HEADER",
    "RESPONSE_HEADER",
    "REQUEST_HEADER_SIZE",
    "RESPONSE_HEADER_SIZE",
    "MSG_AUTHENTICATE",
    "MSG_NEW_EVENT_SOCK",
    "MSG_DISCONNECT",
    "MSG_USER_START",
    "MalformedMessage",
    "Message",
    "Payload",
    "Gather",
    "gathered",
    "heldPayload",
    "payloadSize",
    "encodeRequest",
    "encodeResponse",
    "requestHeader",
    "responseHeader",
    "decodeRequest",
    "decodeResponse",
]

Buffer = Union[bytes, bytearray, memoryview]

Payload = Union[Buffer, Tuple[Buffer, ...]]
"""
A message body: one buffer, or a tuple of buffers that go out as one
message, gathered where they are (libqb's ``sendv`` with an iovec).
"""

Gather = Union[Payload, List[Buffer]]
"""What the sending APIs take: a L{Payload}, or its parts as a list."""


def payloadSize(payload: Payload) -> int:
    """The bytes in a L{Payload}."""
    if isinstance(payload, tuple):
        return sum(len(part) for part in payload)
    return len(payload)


def gathered(payload: Gather) -> Tuple[Payload, int]:
    """
    What a sending API was given, as a L{Payload} of plain byte buffers (a
    list of parts made a tuple; a view of wider items, or a strided one,
    made bytes, so that lengths count bytes and parts copy as bytes), and
    its size.
    """
    if not isinstance(payload, (tuple, list)):
        payload = _bytewise(payload)
        return payload, len(payload)
    parts = []
    size = 0
    for part in payload:
        if type(part) is not bytes:
            part = _bytewise(part)
        parts.append(part)
        size += len(part)
    return tuple(parts), size


def _bytewise(part: Buffer) -> Buffer:
    if isinstance(part, (bytes, bytearray)):
        return part
    view = part if isinstance(part, memoryview) else memoryview(part)
    if view.format == "B" and view.c_contiguous:
        return part
    return view.cast("B") if view.c_contiguous else view.tobytes()


def heldPayload(payload: Payload) -> Payload:
    """
    A L{Payload} safe to keep for a later send: C{bytes} as they are (they
    cannot change), any other buffer copied (its owner may reuse it, or it
    may be a view into a ring).
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, tuple):
        return tuple(p if isinstance(p, bytes) else bytes(p) for p in payload)
    return bytes(payload)

REQUEST_HEADER = struct.Struct("<i4xi4x")
"""``struct qb_ipc_request_header``: id, size (each padded to 8 bytes)."""

RESPONSE_HEADER = struct.Struct("<i4xi4xi4x")
"""``struct qb_ipc_response_header``: id, size, error (each padded to 8)."""

REQUEST_HEADER_SIZE = REQUEST_HEADER.size  # 16
RESPONSE_HEADER_SIZE = RESPONSE_HEADER.size  # 24

MSG_USER_START = 0
"""The first id an application may use."""

MSG_AUTHENTICATE = -1
"""The handshake's id, in the connection request and response."""

MSG_NEW_EVENT_SOCK = -2
"""Dead since libqb 0.15; a 2.x server drops a connection that uses it."""

MSG_DISCONNECT = -3
"""A request with this id asks the server to tear the connection down."""

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


class MalformedMessage(ValueError):
    """
    A message violates libqb's framing.

    Carries an errno so that the layer that catches it can report the same
    code libqb would (``EBADMSG`` for garbage, ``EMSGSIZE`` for sizes).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code
        self.reason = reason


class Message(NamedTuple):
    """
    A decoded libqb message: what a handler or a client receives.

    For requests ``error`` is always 0 (requests carry no error field).
    """

    id: int
    error: int
    payload: bytes


def _checkId(msgId: int) -> None:
    if not _INT32_MIN <= msgId <= _INT32_MAX:
        raise OverflowError(f"message id {msgId} does not fit in an int32")


def requestHeader(msgId: int, payloadLength: int) -> bytes:
    """
    A request's 16-byte header, for a payload sent after it: the
    transports write header and payload as two pieces of one message, so
    a large payload is never copied just to put a header in front.

    The header's ``size`` is the total length, as libqb requires.
    """
    if not _INT32_MIN <= msgId <= _INT32_MAX:
        _checkId(msgId)
    return REQUEST_HEADER.pack(msgId, REQUEST_HEADER_SIZE + payloadLength)


def responseHeader(msgId: int, error: int, payloadLength: int) -> bytes:
    """A response's or an event's 24-byte header (see L{requestHeader})."""
    if not (_INT32_MIN <= msgId <= _INT32_MAX and _INT32_MIN <= error <= _INT32_MAX):
        _checkId(msgId)
        _checkId(error)
    return RESPONSE_HEADER.pack(msgId, RESPONSE_HEADER_SIZE + payloadLength, error)


def encodeRequest(msgId: int, payload: Gather = b"") -> bytes:
    """Frame a request: a 16-byte header followed by ``payload`` (joined)."""
    body = _joined(payload)
    return requestHeader(msgId, len(body)) + body


def encodeResponse(msgId: int, error: int, payload: Gather = b"") -> bytes:
    """
    Frame a response or an event: a 24-byte header followed by ``payload``
    (joined).
    """
    body = _joined(payload)
    return responseHeader(msgId, error, len(body)) + body


def _joined(payload: Gather) -> Buffer:
    # One buffer whose length counts bytes (b"".join takes every part's
    # bytes, whatever its item size).
    if isinstance(payload, (tuple, list)):
        return b"".join(payload)
    return _bytewise(payload)


def decodeRequest(data: Buffer, maxSize: int, copy: bool = True) -> Message:
    """
    Parse one request exactly as it arrived (one datagram or ring chunk).

    With C{copy=False} the payload is a C{memoryview} into C{data}, valid
    only as long as C{data} is.

    Stricter than libqb 2.0.6, which trusts ``hdr.size``: the declared size
    must equal the real length, lie within ``maxSize`` and cover the header,
    so no handler is ever given a length that disagrees with its bytes.

    @raise MalformedMessage: the framing is wrong.
    """
    length = len(data)
    if length < REQUEST_HEADER_SIZE:
        raise MalformedMessage(
            errno.EBADMSG,
            f"request of {length} bytes is shorter than its"
            f" {REQUEST_HEADER_SIZE}-byte header",
        )
    msgId, size = REQUEST_HEADER.unpack_from(data)
    if size != length or size > maxSize:  # (length >= 16: size > 0)
        _checkSize(size, length, maxSize, "request")
    return _message(msgId, 0, data, REQUEST_HEADER_SIZE, copy)


def _message(msgId: int, error: int, data: Buffer, offset: int, copy: bool) -> Message:
    # The payload after the header: a copy, or a view into C{data}.
    view = memoryview(data)[offset:]
    if copy:
        payload = bytes(view)
        view.release()
        return Message(msgId, error, payload)
    return Message(msgId, error, view)  # type: ignore[arg-type]


def decodeResponse(data: Buffer, maxSize: int, copy: bool = True) -> Message:
    """
    Parse one response or event exactly as it arrived.  C{copy} as for
    L{decodeRequest}.

    A C server may send a response a little larger than the negotiated size
    (``qb_ipcs_response_send`` does not check it), so callers pass the size
    of the buffer they were prepared to read rather than the negotiated one.

    @raise MalformedMessage: the framing is wrong.
    """
    length = len(data)
    if length < RESPONSE_HEADER_SIZE:
        raise MalformedMessage(
            errno.EBADMSG,
            f"response of {length} bytes is shorter than its"
            f" {RESPONSE_HEADER_SIZE}-byte header",
        )
    msgId, size, error = RESPONSE_HEADER.unpack_from(data)
    if size != length or size > maxSize:  # (length >= 24: size > 0)
        _checkSize(size, length, maxSize, "response")
    return _message(msgId, error, data, RESPONSE_HEADER_SIZE, copy)


def _checkSize(size: int, length: int, maxSize: int, what: str) -> None:
    if size <= 0:
        raise MalformedMessage(errno.EBADMSG, f"{what} header declares size {size}")
    if size > maxSize:
        raise MalformedMessage(
            errno.EMSGSIZE,
            f"{what} header declares size {size}, more than the maximum {maxSize}",
        )
    if size != length:
        raise MalformedMessage(
            errno.EBADMSG,
            f"{what} header declares size {size} but {length} bytes arrived",
        )
