"""
AF_UNIX sockets the way libqb uses them: non-blocking, close-on-exec,
kernel-supplied peer credentials, and datagram buffers sized for the
negotiated message size.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import stat
import struct
from typing import NamedTuple, Optional, Tuple

from txqb._posix.files import mapFile, openSharedFile
from txqb._wire.naming import clientSocketNames

__all__ = [
    "Credentials",
    "peerCredentials",
    "parseCredentials",
    "CREDENTIALS_CMSG_SPACE",
    "streamListener",
    "streamClient",
    "datagramSocket",
    "sizeBuffers",
    "removeFilesystemSocket",
]

_UCRED = struct.Struct("=iII")
CREDENTIALS_CMSG_SPACE = socket.CMSG_SPACE(_UCRED.size)

# Not exported by every Python build; values from <asm-generic/socket.h>.
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


class Credentials(NamedTuple):
    """A peer's process id, user id and group id, as the kernel reports."""

    pid: int
    uid: int
    gid: int


def peerCredentials(sock: socket.socket) -> Credentials:
    """
    The credentials of the process at the other end of a connected stream
    socket (``SO_PEERCRED``), recorded by the kernel at connect/listen time
    and impossible for the peer to forge.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    return Credentials(*_UCRED.unpack(raw))


def parseCredentials(
    ancillary: list[Tuple[int, int, bytes]],
) -> Optional[Credentials]:
    """
    The ``SCM_CREDENTIALS`` in a ``recvmsg`` result, if any.

    A truncated control message is ignored rather than parsed (libqb's
    CVE-era bug was copying a short one).
    """
    for level, kind, data in ancillary:
        if (
            level == socket.SOL_SOCKET
            and kind == _SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            return Credentials(*_UCRED.unpack_from(data))
    return None


def _socket(kind: int) -> socket.socket:
    return socket.socket(
        socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )


def removeFilesystemSocket(path: bytes) -> None:
    """
    Remove a stale filesystem setup socket at ``path``.

    libqb unlinks whatever is there; txqb removes only a socket, so that a
    mistyped name never deletes a regular file.

    @raise OSError: ``EADDRINUSE`` if ``path`` is something else.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(
            errno.EADDRINUSE, f"{os.fsdecode(path)} exists and is not a socket"
        )
    os.unlink(path)


def streamListener(address: bytes, filesystem: bool, backlog: int = 128) -> socket.socket:
    """
    A listening setup socket at ``address``.

    In filesystem mode the socket file is made world-writable, as libqb
    does: access control is the service's accept policy, not the file mode.
    """
    sock = _socket(socket.SOCK_STREAM)
    try:
        if filesystem:
            removeFilesystemSocket(address)
        sock.bind(address)
        if filesystem:
            os.chmod(address, 0o777)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def streamClient(address: bytes) -> socket.socket:
    """
    A setup socket connected to ``address``, with ``SO_PASSCRED`` on so that
    the kernel attaches the server's credentials to its handshake response.

    @raise OSError: the connect failed; ``EAGAIN`` means the server's
        backlog is full and the caller may retry.
    """
    sock = _socket(socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def sizeBuffers(sock: socket.socket, size: int) -> None:
    """
    Make room for ``size``-byte datagrams, libqb's rule: raise a buffer to
    ``size`` only when it is not already larger.

    As root the ``*BUFFORCE`` options lift the ``net.core.[rw]mem_max`` cap
    that would otherwise make near-megabyte messages fail with
    ``EMSGSIZE``.
    """
    for option, force in (
        (socket.SO_SNDBUF, _SO_SNDBUFFORCE),
        (socket.SO_RCVBUF, _SO_RCVBUFFORCE),
    ):
        if sock.getsockopt(socket.SOL_SOCKET, option) > size:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def datagramSocket(bindAddress: bytes, size: int) -> socket.socket:
    """A non-blocking datagram socket bound to ``bindAddress``."""
    sock = _socket(socket.SOCK_DGRAM)
    try:
        sock.bind(bindAddress)
        sizeBuffers(sock, size)
    except BaseException:
        sock.close()
        raise
    return sock


CONTROL_FILE_SIZE = 24
"""The socket transport's control file: three ``{int32 sent; int32 flow_control}`` pairs."""

CONTROL_REQUEST_SENT = 0
CONTROL_REQUEST_FLOW_CONTROL = 4
CONTROL_EVENT_SENT = 16


class ClientSocketFiles(NamedTuple):
    """What a socket-transport client opens: the control file and two sockets."""

    control: mmap.mmap
    requests: socket.socket
    events: socket.socket


def openClientSocketFiles(controlPath: str, base: str, maxMessageSize: int) -> ClientSocketFiles:
    """
    Map the control file a server announced and bind and connect the
    client's request and event sockets to the server's, as libqb's client
    does; on any failure whatever was opened is closed again.

    @raise OSError: C{EBADMSG} for names no libqb server would send, or the
        error of the failing call.
    """
    if not os.path.isabs(controlPath) or not base:
        raise OSError(
            errno.EBADMSG, f"server named control file {controlPath!r} and base {base!r}"
        )
    names = clientSocketNames(controlPath, base)
    fd = openSharedFile(controlPath, CONTROL_FILE_SIZE)
    try:
        control = mapFile(fd, CONTROL_FILE_SIZE)
    finally:
        os.close(fd)
    sockets = []
    try:
        requests = datagramSocket(names.response, maxMessageSize)
        sockets.append(requests)
        requests.connect(names.request)
        events = datagramSocket(names.event, maxMessageSize)
        sockets.append(events)
        events.connect(names.eventTx)
    except BaseException:
        for sock in sockets:
            sock.close()
        control.close()
        raise
    return ClientSocketFiles(control, requests, events)
