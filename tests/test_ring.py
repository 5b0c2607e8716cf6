"""
The sans-IO ring algorithm, over plain bytearrays: libqb's byte layout
(golden dumps from Debian's libqb 2.0.6) and property-based round trips
through wrap-around.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from typing import Deque, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txqb._wire.headers import encodeRequest
from txqb._wire.ring import (
    HEADER_FILE_SIZE,
    MAGIC_COMMITTED,
    REF_COUNT,
    Ring,
    RingError,
    dataFileSize,
    initializeHeader,
    readPath,
    DATA_PATH,
)


class CountingSemaphore:
    """A semaphore for one process: just the count."""

    def __init__(self) -> None:
        self.count = 0

    def post(self) -> None:
        self.count += 1

    def tryWait(self) -> bool:
        if self.count:
            self.count -= 1
            return True
        return False

    def value(self) -> int:
        return self.count


def _ring(dataSize: int) -> Tuple[Ring, bytearray, bytearray, CountingSemaphore]:
    header, data, sem = bytearray(HEADER_FILE_SIZE), bytearray(dataSize), CountingSemaphore()
    initializeHeader(header, dataSize, "/dev/shm/x/qb-request-s-header", "/dev/shm/x/qb-request-s-data")
    return Ring(header, data, sem), header, data, sem


def _words(data: bytearray, start: int, count: int) -> List[int]:
    return list(struct.unpack_from(f"<{count}I", data, start * 4))


def test_fileSizes() -> None:
    """Observed: 12328 -> 16384 and 100000 -> 102400."""
    assert dataFileSize(12328) == 16384
    assert dataFileSize(100000) == 102400


def test_header() -> None:
    ring, header, _, _ = _ring(16384)
    assert ring.words == 4096
    assert struct.unpack_from("<III", header, 0) == (0, 0, 4096)
    assert struct.unpack_from("<i", header, REF_COUNT) == (1,)
    assert readPath(header, DATA_PATH) == "/dev/shm/x/qb-request-s-data"


def test_goldenConsumedRequests() -> None:
    """Two 21-byte requests written and consumed, as libqb leaves them."""
    ring, header, data, _ = _ring(16384)
    for letter in (b"A", b"B"):
        ring.write(encodeRequest(123, letter * 5))
        assert ring.read() == encodeRequest(123, letter * 5)
    assert _words(data, 0, 16) == [
        0, 0xD0D0D0D0, 0x7B, 0, 0x15, 0, 0x41414141, 0x41,
        0, 0xD0D0D0D0, 0x7B, 0, 0x15, 0, 0x42424242, 0x42,
    ]
    assert (ring.writePointer, ring.readPointer) == (16, 16)


def test_goldenCommittedEvent() -> None:
    ring, _, data, sem = _ring(16384)
    event = struct.pack("<i4xi4xi4x", 1000, 31, 0) + b"x" * 7
    ring.write(event)
    assert _words(data, 0, 3) == [31, MAGIC_COMMITTED, 1000]
    assert sem.count == 1 and ring.pending == 1


def test_fullAndTooBig() -> None:
    ring, _, _, _ = _ring(4096)
    with pytest.raises(RingError) as e:
        ring.write(bytes(4096 - 11))
    assert e.value.errno == errno.EMSGSIZE
    ring.write(bytes(4096 - 12))  # a maximal chunk fits an empty ring
    with pytest.raises(RingError) as e:
        ring.write(b"")
    assert e.value.errno == errno.EAGAIN
    assert ring.read() == bytes(4096 - 12)
    with pytest.raises(RingError) as e:
        ring.read()
    assert e.value.errno == errno.EAGAIN


def test_corruptMagic() -> None:
    """A count without a committed chunk is EBADMSG, and the count stays."""
    ring, _, data, sem = _ring(4096)
    ring.write(b"payload")
    struct.pack_into("<I", data, 4, 0xDEADBEEF)
    with pytest.raises(RingError) as e:
        ring.read()
    assert e.value.errno == errno.EBADMSG
    assert sem.count == 1


def test_corruptSize() -> None:
    ring, _, data, _ = _ring(4096)
    ring.write(b"payload")
    struct.pack_into("<I", data, 0, 0xFFFFFFF0)
    with pytest.raises(RingError) as e:
        ring.read()
    assert e.value.errno == errno.EBADMSG


def test_corruptPointer() -> None:
    ring, header, _, _ = _ring(4096)
    ring.write(b"payload")
    struct.pack_into("<I", header, 4, 10**6)
    with pytest.raises(RingError):
        ring.read()


def test_headerLies() -> None:
    header, data = bytearray(HEADER_FILE_SIZE), bytearray(4096)
    initializeHeader(header, 1 << 20, "/h", "/d")
    with pytest.raises(RingError):
        Ring(header, data, CountingSemaphore())


def test_zeroCopyPeek() -> None:
    ring, _, data, _ = _ring(4096)
    ring.write(b"abcdef")
    view = ring.peek()
    assert isinstance(view, memoryview) and bytes(view) == b"abcdef"
    view.release()
    ring.reclaim()
    assert ring.pending == 0


def test_wrapsThroughEnd() -> None:
    """100 messages of 1017 bytes through a 16 KiB ring (observed working)."""
    ring, _, _, _ = _ring(16384)
    for i in range(100):
        message = bytes((i + j) & 0xFF for j in range(1017))
        ring.write(message[:10], message[10:])
        assert ring.read() == message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.none()), max_size=200))
def test_modelRoundTrip(ops: List[int | None]) -> None:
    """Writes (sizes) and reads (None) behave as a FIFO with libqb's space rule."""
    ring, _, _, _ = _ring(1024)
    model: Deque[bytes] = deque()
    serial = 0
    for op in ops:
        if op is None:
            if model:
                assert ring.read() == model.popleft()
            else:
                with pytest.raises(RingError):
                    ring.read()
            continue
        serial += 1
        message = bytes((serial * 7 + j) & 0xFF for j in range(op))
        free = ring.freeSpace()
        try:
            ring.write(message)
        except RingError as e:
            assert e.errno == errno.EAGAIN and free < op + 12
        else:
            assert free >= op + 12
            model.append(message)
        assert ring.pending == len(model)
    while model:
        assert ring.read() == model.popleft()


def test_queuedWriteKeepsItsBytes() -> None:
    """
    A chunk written later (its ring was full) is written as it was when
    it was sent: a payload that is not C{bytes} (a buffer the caller
    reuses, a view of another ring) is copied when it is queued, and the
    header and payload land as one chunk.
    """
    from twisted.internet.task import Clock

    from txqb._reactor.shmtransport import _RingWriter

    ring, _, _, _ = _ring(4096)
    written: List[int] = []
    writer = _RingWriter(Clock(), ring, lambda: written.append(1))
    filler = bytes(1000)
    for piece in (filler, b"x"):
        while True:
            try:
                ring.write(piece)
            except RingError:
                break
    payload = bytearray(b"original")
    d = writer.write(b"HDR:", payload)
    assert d is not None and not d.called
    payload[:] = b"changed!"
    assert ring.read() == filler
    writer.kick()
    assert d.called and written == [1]
    while ring.read() != b"HDR:original":
        pass
    assert writer.write(b"now:", memoryview(b"direct")) is None
    assert ring.read() == b"now:direct"


def test_roomWatcherSleepsPrecisely() -> None:
    """
    The room watcher's thread asks Linux for a timer slack of 1 ns, so
    that its 25 us looks are not stretched to the default 50 us slack;
    other threads keep theirs.
    """
    import threading

    from txqb._posix.libc import preciseSleeps

    from txqb._posix.libc import libc

    def slack() -> int:
        return int(libc.prctl(30, 0, 0, 0, 0))  # PR_GET_TIMERSLACK

    seen: List[object] = []

    def run() -> None:
        seen.append(slack())
        seen.append(preciseSleeps())
        seen.append(slack())

    before = slack()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen[1] is True and seen[2] == 1 and seen[0] != 1
    assert slack() == before
