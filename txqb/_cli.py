"""
The ``txqb`` command: talk to libqb services from a shell.

``txqb call``, ``listen``, ``ls`` and ``stats`` work against C libqb
servers and txqb servers alike.  The module never imports Twisted, so a
one-shot ``txqb call`` starts fast.

Exit status: 0 on success; 1 when the service cannot be reached, refuses,
times out or goes away (one line on stderr says which); 2 for a usage
error; 3 when ``call`` got a response carrying an error.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import stat
import sys
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence

from txqb._wire.headers import Message
from txqb._wire.naming import DEFAULT_SOCKET_DIR, MAX_SERVICE_NAME, SUN_PATH_SIZE
from txqb.blocking import DEFAULT_MAX_MESSAGE_SIZE, BlockingClient, connect
from txqb.errors import QBError

__all__ = ["main", "ListedService", "listServices", "describe", "STATS_PREFIX"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR_RESPONSE = 3

STATS_PREFIX = b"\0txqb-stats/"
"""
Where a service run by ``twistd qbipc`` publishes its statistics for
``txqb stats``: this prefix plus the service name, as a short abstract
unix address.  libqb always binds the full zero-padded ``sun_path``, so no
libqb name can ever meet a short one; ``/`` cannot occur in a service
name either.
"""

_SO_ACCEPTCON = 0x10000
_SOCK_STREAM = 1


def describe(kind: str, message: Message) -> str:
    """
    One line for a response or event: id, error (with its errno name),
    size, and the payload as text when it is printable UTF-8, else hex.
    """
    parts = [f"{kind} id={message.id} error={message.error}"]
    if message.error < 0:
        parts.append(f"({errno.errorcode.get(-message.error, '?')})")
    payload = message.payload
    parts.append(f"size={len(payload)}")
    if payload:
        try:
            text: Optional[str] = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.isprintable():
            parts.append(f"text={text}")
        else:
            parts.append(f"hex={payload.hex()}")
    return " ".join(parts)


class ListedService(NamedTuple):
    """A listening libqb service found by L{listServices}."""

    name: str
    address: str
    """``abstract`` or the path of the filesystem socket."""
    pid: Optional[int]
    uid: Optional[int]
    command: Optional[str]
    stats: bool
    """Whether it publishes ``txqb stats`` (it is run by ``twistd qbipc``)."""


def _unixTable(path: str = "/proc/net/unix") -> List[tuple[int, str]]:
    """(inode, path) of every listening stream socket with a path."""
    found = []
    with open(path) as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) < 8:
                continue
            flags, kind, inode = int(fields[3], 16), int(fields[4], 16), int(fields[6])
            if kind == _SOCK_STREAM and flags & _SO_ACCEPTCON:
                found.append((inode, fields[7].rstrip("\n")))
    return found


def _owners(inodes: Iterable[int]) -> Dict[int, int]:
    """Map socket inodes to a pid holding them, from /proc/*/fd."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in owners:
                owners[inode] = int(entry)
        if len(owners) == len(wanted):
            break
    return owners


def _process(pid: Optional[int]) -> tuple[Optional[int], Optional[str]]:
    if pid is None:
        return None, None
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/comm") as f:
            return uid, f.read().strip()
    except OSError:
        return None, None


def listServices(
    table: str = "/proc/net/unix", socketDirectory: str = DEFAULT_SOCKET_DIR
) -> List[ListedService]:
    """
    The libqb services listening on this host, sorted by name.

    A libqb setup socket is a listening ``SOCK_STREAM`` socket whose
    abstract name fills the whole ``sun_path`` with NUL padding, which
    /proc/net/unix shows as ``@NAME@@@...``; in filesystem mode it is a
    socket directly in C{socketDirectory}.
    """
    rows = _unixTable(table)
    statsNames = {
        p[len(STATS_PREFIX) :]
        for _, p in rows
        if p.startswith("@" + STATS_PREFIX[1:].decode())
    }
    candidates: List[tuple[int, str, str]] = []
    prefix = os.path.join(socketDirectory, "")
    for inode, path in rows:
        if path.startswith("@") and len(path) == SUN_PATH_SIZE:
            name = path[1:].rstrip("@")
            if name and len(name) <= MAX_SERVICE_NAME and "@" not in name:
                candidates.append((inode, name, "abstract"))
        elif path.startswith(prefix) and "/" not in path[len(prefix) :]:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    candidates.append((inode, path[len(prefix) :], path))
            except OSError:
                pass
    owners = _owners(inode for inode, _, _ in candidates)
    result = []
    for inode, name, address in candidates:
        pid = owners.get(inode)
        uid, command = _process(pid)
        result.append(ListedService(name, address, pid, uid, command, name in statsNames))
    return sorted(result)


def _fail(message: str) -> int:
    print(f"txqb: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_FAILED


def _payload(args: argparse.Namespace) -> bytes:
    if args.hex is not None:
        try:
            return bytes.fromhex(args.hex)
        except ValueError:
            raise SystemExit(f"txqb: --hex {args.hex!r} is not hexadecimal") from None
    if args.file is not None:
        try:
            if args.file == "-":
                return sys.stdin.buffer.read()
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"txqb: cannot read {args.file}: {e.strerror}") from None
    return (args.data or "").encode("utf-8")


def _connect(args: argparse.Namespace) -> BlockingClient:
    return connect(args.name, maxMessageSize=args.max_message_size, timeout=args.timeout)


def _call(args: argparse.Namespace) -> int:
    payload = _payload(args)
    with _connect(args) as client:
        response = client.request(args.id, payload, timeout=args.timeout)
    if args.raw:
        sys.stdout.buffer.write(response.payload)
        sys.stdout.flush()
    else:
        print(describe("response", response))
    return EXIT_ERROR_RESPONSE if response.error else 0


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _listen(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM end the listening cleanly, even where the shell
    # started this process with SIGINT ignored (a background job).  They
    # are held back while connecting, so that the client is either not
    # made or made and closed.
    stopping = {signal.SIGINT, signal.SIGTERM}
    for signum in stopping:
        signal.signal(signum, _stop)
    payload = _payload(args)
    sending = args.id is not None or payload or args.data is not None
    received = 0
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        client = _connect(args)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
        if sending:
            response = client.request(args.id or 0, payload, timeout=args.timeout)
            print(describe("response", response), flush=True)
        while args.count is None or received < args.count:
            print(describe("event", client.receiveEvent(None)), flush=True)
            received += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _ls(args: argparse.Namespace) -> int:
    import json

    services = listServices()
    if args.json:
        print(json.dumps([s._asdict() for s in services]))
        return 0
    if not services:
        print("no libqb services listening")
        return 0
    width = max(len("NAME"), *(len(s.name) for s in services))
    print(f"{'NAME':<{width}}  {'PID':>7}  {'UID':>6}  {'COMMAND':<15}  STATS  ADDRESS")
    for s in services:
        print(
            f"{s.name:<{width}}  {s.pid or '-':>7}  {'-' if s.uid is None else s.uid:>6}"
            f"  {s.command or '-':<15}  {'yes' if s.stats else '-':<5}  {s.address}"
        )
    return 0


def _readStats(name: str, timeout: float) -> Dict[str, Any]:
    import json

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(STATS_PREFIX + name.encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    body: Dict[str, Any] = json.loads(b"".join(chunks))
    return body


def _stats(args: argparse.Namespace) -> int:
    import json

    try:
        body = _readStats(args.name, args.timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        if any(s.name == args.name for s in listServices()):
            return _fail(
                f"service {args.name!r} publishes no statistics (only services run by"
                " twistd qbipc do)"
            )
        return _fail(f"no libqb service {args.name!r} is listening")
    except socket.timeout:
        return _fail(f"service {args.name!r} sent no statistics within {args.timeout} s")
    except (OSError, ValueError) as e:
        return _fail(f"cannot read the statistics of {args.name!r}: {e}")
    if "error" in body:
        return _fail(f"service {args.name!r} refused its statistics: {body['error']}")
    if args.json:
        print(json.dumps(body))
        return 0
    connections = body["connections"]
    print(
        f"service {body['service']} (pid {body['pid']}, {body['transport']} transport,"
        f" rate {body['rateLimit']}): {len(connections)} connected,"
        f" {body['closedConnections']} closed"
    )
    for c in connections:
        extra = {k: v for k, v in c.items() if k not in ("pid", "uid", "gid", "clientPid")}
        print(
            f"  pid {c['pid']} uid {c['uid']} gid {c['gid']}: "
            + " ".join(f"{k}={v}" for k, v in extra.items())
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="txqb", description="Talk to libqb IPC services (C libqb or txqb)."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    def connecting(verb: argparse.ArgumentParser) -> None:
        verb.add_argument("name", metavar="NAME", help="the libqb service name")
        verb.add_argument(
            "--timeout", type=float, default=5.0, metavar="S",
            help="seconds to wait for the connection and the response (default 5)",
        )
        verb.add_argument(
            "--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE, metavar="B",
            help=f"message size to ask for (default {DEFAULT_MAX_MESSAGE_SIZE})",
        )

    def requesting(verb: argparse.ArgumentParser, defaultId: Optional[int]) -> None:
        verb.add_argument("--id", type=int, default=defaultId, metavar="N", help="request id")
        payload = verb.add_mutually_exclusive_group()
        payload.add_argument("--data", metavar="TEXT", help="payload as UTF-8 text")
        payload.add_argument("--hex", metavar="HEX", help="payload as hexadecimal")
        payload.add_argument("--file", metavar="F", help="payload from a file (- for stdin)")

    call = verbs.add_parser("call", help="send one request and print its response")
    connecting(call)
    requesting(call, 0)
    call.add_argument("--raw", action="store_true", help="write only the payload bytes")
    call.set_defaults(run=_call)

    listen = verbs.add_parser("listen", help="print events until interrupted")
    connecting(listen)
    requesting(listen, None)
    listen.add_argument("--count", type=int, metavar="N", help="exit after N events")
    listen.set_defaults(run=_listen)

    ls = verbs.add_parser("ls", help="list the libqb services listening on this host")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=_ls)

    stats = verbs.add_parser("stats", help="statistics of a service run by twistd qbipc")
    stats.add_argument("name", metavar="NAME")
    stats.add_argument("--timeout", type=float, default=5.0, metavar="S")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=_stats)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
        return status
    except QBError as e:
        return _fail(str(e))
    except ValueError as e:
        print(f"txqb: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
