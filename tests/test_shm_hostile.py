"""
Hostile SHM peers and hostile file systems against a txqb server.

A raw SHM client (written here with txqb's own ring code, so it can break
the rules on purpose) corrupts its request ring; names the server will
create are pre-taken by files and symlinks; ``/dev/shm`` is full.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import subprocess
import tempfile
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

import txqb
from handlers import PeerHandlers
from txqb._posix.files import PrivateDirectory, createSharedFile
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.handshake import CONNECTION_RESPONSE_SIZE, ConnectionRequest, ConnectionResponse
from txqb._wire.headers import encodeRequest
from txqb._wire.naming import abstractAddress
from txqb._wire.ring import DATA_PATH, MAGIC_COMMITTED, SEMAPHORE, Ring, readPath


class RawShmClient:
    """Connects over SHM by hand and maps the request ring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.setup = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.setup.settimeout(10)
        self.maps: List[mmap.mmap] = []

    def connect(self) -> None:
        self.setup.connect(abstractAddress(self.name.encode()))
        self.setup.sendall(ConnectionRequest(12328).encode())
        data = b""
        while len(data) < CONNECTION_RESPONSE_SIZE:
            data += self.setup.recv(CONNECTION_RESPONSE_SIZE - len(data))
        response = ConnectionResponse.decode(data)
        assert response.transport == 1
        header = self._map(response.request + "-header")
        self.data = self._map(readPath(memoryview(header), DATA_PATH))
        struct.pack_into("<i", header, 8204, 2)  # attached, as a C client
        self.sem = SharedSemaphore(header, SEMAPHORE)
        self.ring = Ring(memoryview(header), memoryview(self.data), self.sem)

    def _map(self, path: str) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.maps.append(m)
        return m

    def closedByPeer(self) -> bool:
        try:
            return self.setup.recv(1) == b""
        except ConnectionResetError:
            # Closed with our doorbell byte still unread: the kernel resets.
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        if hasattr(self, "ring"):
            del self.ring
            self.sem.release()
        for m in self.maps:
            m.close()
        self.setup.close()


@pytest.mark.parametrize("damage", ["magic", "size", "count-without-chunk"])
@pytest_twisted.ensureDeferred
async def test_corruptRequestRing(reactor: Any, serviceName: str, damage: str) -> None:
    """Only the corrupting client is dropped; the server neither spins nor dies."""
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport="shm")
    bystander = RawShmClient(serviceName)
    raw = RawShmClient(serviceName)
    try:

        def corrupt() -> bool:
            raw.connect()
            # Lay the bad chunk down before the semaphore says it is there,
            # so that the server cannot read a good one in between.
            if damage == "magic":
                struct.pack_into("<II", raw.data, 0, 21, 0xBAD0BAD0)
            elif damage == "size":
                struct.pack_into("<II", raw.data, 0, 0xBAD0BAD0, MAGIC_COMMITTED)
            raw.sem.post()
            raw.setup.send(b"\x01")
            return raw.closedByPeer()

        assert await deferToThread(corrupt)
        assert len(service.connections) == 0

        def behave() -> bytes:
            bystander.connect()
            bystander.ring.write(encodeRequest(0, b"fine"))
            bystander.setup.send(b"\x01")
            return b"sent"

        await deferToThread(behave)
        assert len(service.connections) == 1
    finally:
        raw.close()
        bystander.close()
        await service.stopListening()


def test_precreatedNames(tmp_path: Any) -> None:
    """A name already taken, by a file or a symlink, is never reused or followed."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    directory = PrivateDirectory.create("qb-txqbtest-", os.getuid(), os.getgid(), parent=str(tmp_path))
    try:
        os.symlink(victim, os.path.join(directory.path, "qb-request-s-header"))
        with open(os.path.join(directory.path, "qb-request-s-data"), "wb") as f:
            f.write(b"planted")
        for name in ("qb-request-s-header", "qb-request-s-data"):
            with pytest.raises(FileExistsError):
                createSharedFile(directory.fd, name, 8252, os.getuid(), os.getgid(), 0o600)
        assert victim.read_bytes() == b"precious"
        assert oct(os.stat(directory.path).st_mode & 0o777) == "0o770"
    finally:
        for name in os.listdir(directory.path):
            os.unlink(os.path.join(directory.path, name))
        directory.remove()


@pytest.fixture
def tinyShm() -> Iterator[str]:
    """A 64 KiB tmpfs standing in for a full /dev/shm (needs root)."""
    path = tempfile.mkdtemp(prefix="txqbtest-shm-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], capture_output=True)
    if result.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


@pytest_twisted.ensureDeferred
async def test_shmFull(reactor: Any, serviceName: str, tinyShm: str) -> None:
    """No room for the rings: a clean ENOSPC refusal, no SIGBUS, nothing left."""
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport="shm", shmDirectory=tinyShm)
    try:
        with pytest.raises(txqb.RefusedError) as e:
            await txqb.connect(reactor, serviceName, maxMessageSize=1 << 20)
        assert e.value.errno == errno.ENOSPC
        assert os.listdir(tinyShm) == []
    finally:
        await service.stopListening()
