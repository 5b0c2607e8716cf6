"""
The sans-IO core, against bytes observed from Debian's libqb 2.0.6.

The golden byte strings below were captured from real libqb (strace of a C
client and server, see the wire-protocol notes); the interop tests capture
them again live from the C peers (test_interop_socket.py).
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txqb._wire.handshake import (
    CONNECTION_REQUEST_SIZE,
    CONNECTION_RESPONSE_SIZE,
    ConnectionRequest,
    ConnectionResponse,
    negotiateMaxMessageSize,
)
from txqb._wire.headers import (
    MalformedMessage,
    Message,
    decodeRequest,
    decodeResponse,
    encodeRequest,
    encodeResponse,
)
from txqb._wire.naming import (
    MAX_SERVICE_NAME,
    abstractAddress,
    clientSocketNames,
    serviceAddress,
    shmNames,
    socketNames,
)
from txqb._wire.pairing import ReplyQueue, Slot

# qb_ipcc_connect(name, 0) from libqb 2.0.6: id -1, size 24, max 12328.
GOLDEN_CONNECT_REQUEST = bytes.fromhex("ffffffff00000000" "1800000000000000" "2830000000000000")
# qb_ipcc_send of id 123 with eight 'A's.
GOLDEN_REQUEST = bytes.fromhex("7b00000000000000" "1800000000000000") + b"A" * 8
# The echoed response: id 123, size 32, error 0.
GOLDEN_RESPONSE = (
    bytes.fromhex("7b00000000000000" "2000000000000000" "0000000000000000") + b"A" * 8
)


def test_sizes() -> None:
    assert CONNECTION_REQUEST_SIZE == 24
    assert CONNECTION_RESPONSE_SIZE == 12328


def test_connectionRequestGolden() -> None:
    assert ConnectionRequest(12328).encode() == GOLDEN_CONNECT_REQUEST
    assert ConnectionRequest.decode(GOLDEN_CONNECT_REQUEST) == ConnectionRequest(12328)


@pytest.mark.parametrize(
    "data",
    [
        GOLDEN_CONNECT_REQUEST[:23],
        bytes.fromhex("feffffff") + GOLDEN_CONNECT_REQUEST[4:],  # id -2
        GOLDEN_CONNECT_REQUEST[:8] + bytes.fromhex("10") + GOLDEN_CONNECT_REQUEST[9:],
    ],
)
def test_connectionRequestBad(data: bytes) -> None:
    with pytest.raises(MalformedMessage) as e:
        ConnectionRequest.decode(data)
    assert e.value.errno == errno.EBADMSG


def test_refusalBytes() -> None:
    """libqb's -EACCES refusal: bytes 16..19 are f3 ff ff ff, all else 0."""
    raw = ConnectionResponse.refusal(errno.EACCES).encode()
    assert len(raw) == CONNECTION_RESPONSE_SIZE
    assert raw[:4] == b"\xff\xff\xff\xff"
    assert raw[8:12] == (12328).to_bytes(4, "little")
    assert raw[16:20] == b"\xf3\xff\xff\xff"
    assert raw[24:] == bytes(len(raw) - 24)


def test_responseLayout() -> None:
    response = ConnectionResponse(0, 0, 12328, "/dev/shm/qb-1-2-3-abcdef/qb-control-x", "B", "", 0x1234)
    raw = response.encode()
    assert raw[24:28] == bytes(4)
    assert raw[28:32] == (12328).to_bytes(4, "little")
    assert raw[32:40] == (0x1234).to_bytes(8, "little")
    assert raw[40:].startswith(b"/dev/shm/qb-1-2-3-abcdef/qb-control-x\0")
    assert raw[4136:4138] == b"B\0"
    assert raw[8232] == 0
    assert ConnectionResponse.decode(raw) == response


def test_responseUnterminated() -> None:
    raw = bytearray(ConnectionResponse(0, 0, 1, "", "", "").encode())
    raw[40 : 40 + 4096] = b"x" * 4096
    with pytest.raises(MalformedMessage):
        ConnectionResponse.decode(bytes(raw))


def test_messagesGolden() -> None:
    assert encodeRequest(123, b"A" * 8) == GOLDEN_REQUEST
    assert decodeRequest(GOLDEN_REQUEST, 12328) == Message(123, 0, b"A" * 8)
    assert encodeResponse(123, 0, b"A" * 8) == GOLDEN_RESPONSE
    assert decodeResponse(GOLDEN_RESPONSE, 12328) == Message(123, 0, b"A" * 8)
    # In parts, or as a view of wider items: the header counts bytes.
    wide = memoryview(b"A" * 8).cast("I")
    assert encodeRequest(123, [b"AAA", bytearray(b"AAAAA")]) == GOLDEN_REQUEST
    assert encodeRequest(123, wide) == GOLDEN_REQUEST
    assert encodeResponse(123, 0, (wide[:1], wide[1:])) == GOLDEN_RESPONSE
    assert encodeResponse(123, 0, wide) == GOLDEN_RESPONSE


def _withSize(data: bytes, size: int) -> bytes:
    return data[:8] + size.to_bytes(4, "little", signed=True) + data[12:]


@pytest.mark.parametrize(
    "data, code",
    [
        (GOLDEN_REQUEST[:15], errno.EBADMSG),
        (_withSize(GOLDEN_REQUEST, 0), errno.EBADMSG),
        (_withSize(GOLDEN_REQUEST, -1), errno.EBADMSG),
        (_withSize(GOLDEN_REQUEST, 23), errno.EBADMSG),
        (_withSize(GOLDEN_REQUEST, 25), errno.EBADMSG),
        (_withSize(GOLDEN_REQUEST, 100000), errno.EMSGSIZE),
    ],
)
def test_requestMalformed(data: bytes, code: int) -> None:
    with pytest.raises(MalformedMessage) as e:
        decodeRequest(data, 12328)
    assert e.value.errno == code


def test_responseMalformed() -> None:
    with pytest.raises(MalformedMessage):
        decodeResponse(GOLDEN_RESPONSE[:23], 12328)
    with pytest.raises(MalformedMessage):
        decodeResponse(_withSize(GOLDEN_RESPONSE, 31), 12328)


@given(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=300))
def test_requestRoundTrip(msgId: int, payload: bytes) -> None:
    assert decodeRequest(encodeRequest(msgId, payload), 1000) == Message(msgId, 0, payload)


@given(
    st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1), st.binary(max_size=300)
)
def test_responseRoundTrip(msgId: int, error: int, payload: bytes) -> None:
    encoded = encodeResponse(msgId, error, payload)
    assert decodeResponse(encoded, 1000) == Message(msgId, error, payload)


def test_idOverflow() -> None:
    with pytest.raises(OverflowError):
        encodeRequest(2**31)


def test_negotiate() -> None:
    assert negotiateMaxMessageSize(100, 0, 10**6) == 100  # no 12328 floor server-side
    assert negotiateMaxMessageSize(12328, 200000, 10**6) == 200000  # enforce is a floor
    with pytest.raises(MalformedMessage) as e:
        negotiateMaxMessageSize(0xFFFFFFFF, 0, 10**6)
    assert e.value.errno == errno.EMSGSIZE


def test_abstractAddress() -> None:
    """Full 108-byte sun_path, zero padded: the short form never meets libqb."""
    address = abstractAddress(b"probetest")
    assert len(address) == 108
    assert address == b"\0probetest" + bytes(98)


def test_serviceNames() -> None:
    assert serviceAddress("x", filesystem=True) == b"/tmp/x"
    assert len(serviceAddress("y" * MAX_SERVICE_NAME, filesystem=False)) == 108
    for bad in ("", "a/b", "a\0b", "z" * (MAX_SERVICE_NAME + 1)):
        with pytest.raises(ValueError):
            serviceAddress(bad, filesystem=False)


def test_socketNames() -> None:
    """Names as libqb 2.0.6 makes them (observed: qb-control-pq, qb-pq-request)."""
    names = socketNames("/dev/shm/qb-10168-10171-7-2qEfT4", "pq")
    assert names.control == "/dev/shm/qb-10168-10171-7-2qEfT4/qb-control-pq"
    assert names.base == "/dev/shm/qb-10168-10171-7-2qEfT4/qb-pq"
    assert names.request == abstractAddress(b"/dev/shm/qb-10168-10171-7-2qEfT4/qb-pq-request")
    assert names.eventTx.rstrip(b"\0").endswith(b"-event-tx")
    assert clientSocketNames(names.control, names.base) == names


def test_socketNamesLongService() -> None:
    """A long service name is shortened in the base so no address is cut."""
    names = socketNames("/dev/shm/qb-4000000-4000000-1000-abcdef", "s" * 106)
    for address in (names.request, names.response, names.eventTx, names.event):
        assert len(address) == 108 and address[-1] == 0
    assert names.response.rstrip(b"\0").endswith(b"-response")


def test_shmNames() -> None:
    names = shmNames("/dev/shm/qb-1-2-7-9cqZ48", "probeshm")
    assert names.request == "/dev/shm/qb-1-2-7-9cqZ48/qb-request-probeshm"
    assert names.event == "/dev/shm/qb-1-2-7-9cqZ48/qb-event-probeshm"


def test_replyQueueOrder() -> None:
    queue: ReplyQueue[str] = ReplyQueue()
    queue.push("a")
    slot = queue.push("b")
    queue.push("c")
    slot.abandon()
    assert queue.pop() == "a"
    assert queue.pop() is None  # b's late reply is discarded
    assert queue.pop() == "c"
    with pytest.raises(LookupError):
        queue.pop()


def test_replySlotLetsGoOfItsWaiter() -> None:
    """
    A slot taken by its reply holds its waiter no longer (a canceller
    that still holds the slot keeps no waiter alive, nor a cycle), and
    C{abandon} serves as a Deferred's canceller, called with the Deferred.
    """
    queue: ReplyQueue[str] = ReplyQueue()
    taken = queue.push("a")
    cancelled = Slot("b")
    queue.append(cancelled)
    cancelled.abandon("the Deferred")
    assert queue.pop() == "a"
    assert taken.waiter is None
    assert queue.pop() is None


def test_replyQueueDrain() -> None:
    queue: ReplyQueue[str] = ReplyQueue()
    queue.push("a")
    queue.push("b").abandon()
    assert queue.drain() == ["a"]
    assert len(queue) == 0
