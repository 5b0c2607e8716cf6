"""
libqb's naming rules: service addresses and per-connection object names.

Pure functions over strings and bytes; the OS layer turns them into
``bind()``/``connect()`` calls and files.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "SUN_PATH_SIZE",
    "MAX_SERVICE_NAME",
    "DEFAULT_SOCKET_DIR",
    "FORCE_FILESYSTEM_FLAG",
    "DESCRIPTION_SUFFIX_LENGTH",
    "abstractAddress",
    "filesystemAddress",
    "serviceAddress",
    "descriptionTemplate",
    "SocketNames",
    "socketNames",
    "clientSocketNames",
    "ShmNames",
    "shmNames",
    "validateServiceName",
]

SUN_PATH_SIZE = 108
"""``sizeof(((struct sockaddr_un *)0)->sun_path)`` on Linux."""

MAX_SERVICE_NAME = SUN_PATH_SIZE - 2
"""
The longest name libqb can put in an abstract address: ``sun_path`` minus
the leading NUL and the terminator that libqb's ``snprintf`` keeps.
"""

DEFAULT_SOCKET_DIR = "/tmp"
"""Where Debian's libqb puts filesystem setup sockets (``SOCKETDIR``)."""

FORCE_FILESYSTEM_FLAG = "/etc/libqb/force-filesystem-sockets"
"""The file whose existence switches libqb to filesystem setup sockets."""

DESCRIPTION_SUFFIX_LENGTH = 6
"""libqb's ``mkdtemp`` template ends in ``XXXXXX``."""


def validateServiceName(name: str) -> bytes:
    """
    Check that ``name`` can be a libqb service name and return its bytes.

    libqb silently truncates names longer than 106 bytes, so two long names
    could meet at one address; txqb refuses them instead.

    @raise ValueError: empty, too long, or containing ``/`` or NUL.
    """
    raw = name.encode("utf-8")
    if not raw:
        raise ValueError("a service name cannot be empty")
    if len(raw) > MAX_SERVICE_NAME:
        raise ValueError(
            f"service name is {len(raw)} bytes; libqb allows at most"
            f" {MAX_SERVICE_NAME}"
        )
    if b"\0" in raw or b"/" in raw:
        raise ValueError(f"service name {name!r} contains NUL or '/'")
    return raw


def abstractAddress(name: bytes) -> bytes:
    """
    The abstract-namespace ``sun_path`` libqb uses for ``name``.

    libqb binds and connects with the whole 108-byte ``sun_path`` (address
    length 110), zero padded; the kernel compares abstract names over their
    full length, so the short form ``b"\\0" + name`` never meets libqb.
    """
    if len(name) > SUN_PATH_SIZE - 2:
        raise ValueError(f"abstract name of {len(name)} bytes is too long")
    return (b"\0" + name).ljust(SUN_PATH_SIZE, b"\0")


def filesystemAddress(name: bytes, socketDir: str = DEFAULT_SOCKET_DIR) -> bytes:
    """
    The path of a filesystem setup socket, ``SOCKETDIR/NAME``.

    @raise ValueError: the path does not fit in ``sun_path``.
    """
    path = os.path.join(os.fsencode(socketDir), name)
    if len(path) >= SUN_PATH_SIZE:
        raise ValueError(f"socket path {path!r} does not fit in sun_path")
    return path


def serviceAddress(
    name: str, filesystem: bool, socketDir: str = DEFAULT_SOCKET_DIR
) -> bytes:
    """The setup-socket address of service ``name`` in either namespace."""
    raw = validateServiceName(name)
    if filesystem:
        return filesystemAddress(raw, socketDir)
    return abstractAddress(raw)


def descriptionTemplate(serverPid: int, clientPid: int, fd: int) -> str:
    """
    The prefix of a connection's private directory under ``/dev/shm``.

    libqb names it ``qb-<server pid>-<client pid>-<setup fd>-XXXXXX``; the
    OS layer appends the random suffix when it creates the directory.
    """
    return f"qb-{serverPid}-{clientPid}-{fd}-"


class SocketNames(NamedTuple):
    """The names of one ``QB_IPC_SOCKET`` connection's objects."""

    control: str
    """Path of the 24-byte control file."""
    base: str
    """The base name, sent to the client as the ``response`` string."""
    request: bytes
    """Abstract address the server's request/response socket binds."""
    response: bytes
    """Abstract address the client's request/response socket binds."""
    eventTx: bytes
    """Abstract address the server's event socket binds."""
    event: bytes
    """Abstract address the client's event socket binds."""


MAX_CHANNEL_SUFFIX = len("-response")
"""The longest suffix libqb appends to a socket-transport base name."""


def _channelAddress(base: bytes, suffix: bytes) -> bytes:
    # libqb writes these names with snprintf into sun_path + 1, so a name
    # longer than 106 bytes is cut there; do the same so both ends agree.
    return abstractAddress((base + suffix)[: SUN_PATH_SIZE - 2])


def _channelAddresses(base: str) -> tuple[bytes, bytes, bytes, bytes]:
    raw = os.fsencode(base)
    return (
        _channelAddress(raw, b"-request"),
        _channelAddress(raw, b"-response"),
        _channelAddress(raw, b"-event-tx"),
        _channelAddress(raw, b"-event"),
    )


def socketNames(directory: str, service: str) -> SocketNames:
    """
    Names for a socket-transport connection whose private directory is
    ``directory``.

    libqb's description is ``<directory>/qb``; the control file is
    ``<description>-control-<service>`` and the base is
    ``<description>-<service>``.  The datagram sockets are always abstract,
    even in filesystem-socket mode, because their names start with ``/``.
    """
    description = os.path.join(directory, "qb")
    # The client takes the base from the connection response, so the
    # server may shorten it: cut the service part so that no channel name
    # needs truncating (libqb would silently truncate and could collide).
    room = SUN_PATH_SIZE - 2 - MAX_CHANNEL_SUFFIX - len(os.fsencode(description)) - 1
    shortService = os.fsencode(service)[: max(room, 1)].decode("utf-8", "ignore")
    base = f"{description}-{shortService}"
    return SocketNames(
        f"{description}-control-{service}", base, *_channelAddresses(base)
    )


def clientSocketNames(control: str, base: str) -> SocketNames:
    """
    The names a client derives from the connection response's ``request``
    (the control file) and ``response`` (the base name) strings.

    @raise ValueError: a name that cannot be an abstract address.
    """
    return SocketNames(control, base, *_channelAddresses(base))


class ShmNames(NamedTuple):
    """Ring base names of one ``QB_IPC_SHM`` connection."""

    request: str
    response: str
    event: str


def shmNames(directory: str, service: str) -> ShmNames:
    """
    Ring base names: ``<description>-<channel>-<service>``; each ring is a
    ``-header`` and a ``-data`` file.
    """
    description = os.path.join(directory, "qb")
    return ShmNames(
        f"{description}-request-{service}",
        f"{description}-response-{service}",
        f"{description}-event-{service}",
    )
