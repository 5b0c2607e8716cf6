"""
txqb's ring algorithm and glibc semaphore binding against real libqb's
``qb_rb`` (ctypes into ``libqb.so.100``): libqb creates a process-shared
ring, txqb maps the same files, and each side reads what the other wrote,
through many wrap-arounds.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from typing import Any, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import threads

from txqb._posix.files import MirroredMap
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.ring import HEADER_STRUCT_SIZE, SEMAPHORE, Ring, RingError

_CREATE, _SHARED_PROCESS = 0x01, 0x08


def _libqb() -> Any:
    try:
        qb = ctypes.CDLL("libqb.so.100", use_errno=True)
    except OSError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"libqb.so.100 missing under CI: {e}")
        pytest.skip(f"libqb.so.100 missing: {e}")
    qb.qb_rb_open.restype = ctypes.c_void_p
    qb.qb_rb_open.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_size_t]
    qb.qb_rb_chunk_write.restype = ctypes.c_ssize_t
    qb.qb_rb_chunk_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    qb.qb_rb_chunk_read.restype = ctypes.c_ssize_t
    qb.qb_rb_chunk_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32]
    qb.qb_rb_close.argtypes = [ctypes.c_void_p]
    return qb


class Mapped:
    """txqb's view of a ring libqb created: its data mapped plainly or mirrored."""

    def __init__(self, name: str, mirrored: bool) -> None:
        base = f"/dev/shm/qb-{name}"
        self.maps: List[Any] = []
        views = []
        for suffix in ("header", "data"):
            fd = os.open(f"{base}-{suffix}", os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if suffix == "data" and mirrored:
                    m: Any = MirroredMap(fd, size)
                    views.append(m.view)
                else:
                    m = mmap.mmap(fd, size)
                    views.append(memoryview(m))
                self.maps.append(m)
            finally:
                os.close(fd)
        header = self.maps[0]
        assert len(header) >= HEADER_STRUCT_SIZE
        self.sem = SharedSemaphore(header, SEMAPHORE)
        self.ring = Ring(views[0], views[1], self.sem)
        assert self.ring.mirrored == mirrored
        self._views = views

    def close(self) -> None:
        self.ring.release()
        del self.ring
        self.sem.release()
        for v in self._views:
            v.release()
        for m in self.maps:
            m.close()


@pytest.fixture(params=["plain", "mirrored"])
def shared(serviceName: str, request: Any) -> Iterator[Tuple[Any, Any, Mapped]]:
    qb = _libqb()
    rb = qb.qb_rb_open(serviceName.encode(), 8192, _CREATE | _SHARED_PROCESS, 0)
    assert rb, os.strerror(ctypes.get_errno())
    mapped = Mapped(serviceName, request.param == "mirrored")
    try:
        yield qb, rb, mapped
    finally:
        mapped.close()
        qb.qb_rb_close(rb)


def _message(i: int) -> bytes:
    return bytes((i * 31 + j) & 0xFF for j in range(1 + (i * 97) % 1500))


def test_txqbWritesLibqbReads(shared: Tuple[Any, Any, Mapped]) -> None:
    qb, rb, mapped = shared
    out = ctypes.create_string_buffer(8192)
    for i in range(300):
        mapped.ring.write(_message(i)[:3], _message(i)[3:])
        n = qb.qb_rb_chunk_read(rb, out, 8192, 0)
        assert n == len(_message(i)), n
        assert out.raw[:n] == _message(i)


def test_libqbWritesTxqbReads(shared: Tuple[Any, Any, Mapped]) -> None:
    qb, rb, mapped = shared
    wrapped = 0
    for i in range(300):
        message = _message(i)
        assert qb.qb_rb_chunk_write(rb, message, len(message)) == len(message)
        assert mapped.ring.pending == 1
        before = mapped.ring.readPointer
        chunk = mapped.ring.peek()
        # A mirrored ring hands out even a chunk across its end as a view.
        assert isinstance(chunk, memoryview) == (mapped.ring.mirrored or before * 4 + 8 + len(message) <= mapped.ring.size)
        wrapped += before * 4 + 8 + len(message) > mapped.ring.size
        assert bytes(chunk) == message
        if isinstance(chunk, memoryview):
            chunk.release()
        mapped.ring.reclaim()
    assert wrapped > 0
    with pytest.raises(RingError):
        mapped.ring.read()


def test_fillsLikeLibqb(shared: Tuple[Any, Any, Mapped]) -> None:
    """txqb fills the ring libqb's way, and libqb drains it all in order."""
    qb, rb, mapped = shared
    written = []
    while True:
        message = _message(len(written))
        try:
            mapped.ring.write(message)
        except RingError:
            break
        written.append(message)
    out = ctypes.create_string_buffer(8192)
    for message in written:
        n = qb.qb_rb_chunk_read(rb, out, 8192, 0)
        assert out.raw[:n] == message
    assert qb.qb_rb_chunk_read(rb, out, 8192, 0) < 0


_WAITER = """
import mmap, os, sys
from txqb._posix.files import MirroredMap
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.ring import SEMAPHORE
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
sem = SharedSemaphore(m, SEMAPHORE)
print("waiting", flush=True)
print("woken" if sem.timedWait(20) else "timeout", flush=True)
sem.release()
"""


def test_crossProcessWakeUp(shared: Tuple[Any, Any, Mapped], serviceName: str) -> None:
    """A post in this process wakes a sem_timedwait in another (pshared)."""
    _, _, mapped = shared
    waiter = subprocess.Popen(
        [sys.executable, "-c", _WAITER, f"/dev/shm/qb-{serviceName}-header"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stdout is not None
        assert waiter.stdout.readline().strip() == "waiting"
        mapped.sem.post()
        assert waiter.stdout.readline().strip() == "woken"
    finally:
        waiter.stdout.close() if waiter.stdout else None
        assert waiter.wait(30) == 0


def test_burstyReaderAgainstFastWriter(serviceName: str, cpeers: Any) -> None:
    """
    A fast C writer (libqb's qb_rb_chunk_write in a tight loop) against
    txqb's reader that sleeps whenever the ring is empty, as a reactor-driven
    client does: every chunk arrives once, in order, none overwritten.

    This caught a real bug: ``struct.pack_into`` zeroes its target before
    writing, so the C writer sometimes read a read pointer of 0, believed
    the ring nearly empty and lapped the reader by a whole ring.  With the
    old byte-wise store of the read pointer this test failed in three runs
    of four.
    """
    import time

    qb = _libqb()
    rb = qb.qb_rb_open(serviceName.encode(), 65549, _CREATE | _SHARED_PROCESS, 0)
    assert rb, os.strerror(ctypes.get_errno())
    mapped = Mapped(serviceName, mirrored=True)
    count = 150000
    writer = subprocess.Popen([str(cpeers.rbWriter), serviceName, str(count)])
    try:
        expected = 0
        deadline = time.monotonic() + 90
        while expected < count and time.monotonic() < deadline:
            try:
                chunk = mapped.ring.read()
            except RingError:
                time.sleep(0.001)
                continue
            seq = int.from_bytes(chunk[:4], "little")
            assert seq == expected, f"chunk {expected} was overwritten by chunk {seq}"
            assert len(chunk) in (56, 65536)
            expected += 1
        assert expected == count
        assert writer.wait(30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        mapped.close()
        qb.qb_rb_close(rb)


def test_mirroredMapOutlivesClose(tmp_path: Any) -> None:
    """
    Both halves of a mirrored map are the same file; a view kept past
    close() keeps the memory mapped (no crash), and the last view gone
    unmaps it.
    """
    path = tmp_path / "data"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        mirrored = MirroredMap(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    size = mmap.PAGESIZE
    view = mirrored.view
    view[size - 2 : size + 2] = b"abcd"
    assert bytes(view[:2]) == b"cd" and bytes(view[2 * size - 2 :]) == b"ab"
    with open(path, "rb") as f:
        assert f.read(2) == b"cd"

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(str(path) in line for line in f)

    kept = view[size - 2 : size + 2]
    mirrored.close()
    with pytest.raises(ValueError):
        view[0]
    assert mappings() == 2
    assert bytes(kept) == b"abcd"
    del kept
    assert mappings() == 0
    with pytest.raises(ValueError, match="whole pages"):
        MirroredMap(-1, 100)


@pytest_twisted.ensureDeferred
async def test_fullRingWaitsForItsReader(shared: Tuple[Any, Any, Mapped], reactor: Any) -> None:
    """
    A txqb writer facing a full ring goes on by itself once libqb's
    reader (another thread, telling nobody) makes room: the room
    watcher sees it, no kick and no timer needed, and the chunks reach
    the reader whole and in order.
    """
    import threading

    from txqb._reactor.shmtransport import _RingWriter

    class NoTimers:
        callFromThread = reactor.callFromThread

        def callLater(self, *args: Any) -> None:
            raise AssertionError("a full ring was retried on a timer")

    qb, rb, mapped = shared
    writer = _RingWriter(NoTimers(), mapped.ring, lambda: None)
    sent = [_message(i) for i in range(40)]
    results = [writer.write(m[:2], m[2:]) for m in sent]
    waiting = [d for d in results if d is not None]
    assert waiting, "the ring never filled"
    got: List[bytes] = []

    def read() -> None:
        out = ctypes.create_string_buffer(8192)
        while len(got) < len(sent):
            n = qb.qb_rb_chunk_read(rb, out, 8192, 5000)
            assert n > 0, n
            got.append(out.raw[:n])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for d in waiting:
            await d
    finally:
        await threads.deferToThread(reader.join, 30)
    assert got == sent
    writer.close(OSError("done"))
