"""
A smoke run of every benchmark cell (bench/), so that the benchmarks keep
working.  No timing is checked: only that every cell ran with its full
count and that every payload came back intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import utils

import txqb
from bench.protocol import payload, payloadOk, payloadParts
from bench.run import ROOT, SIZES, BenchError, buildC, checkResults, pairs
from txqb.server import ServiceHandlers


def test_every_cell(tmp_path: Path, serviceName: str) -> None:
    """
    Every pair, transport, workload and size runs, against real C libqb
    where a side is C, and reports its full count with intact payloads.
    """
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--rounds", "1", "--clients", "20",
         "--shots", "1", "--prefix", serviceName, "--json", str(out)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    cells = {(c["pair"], c["workload"], c["size"]): c for c in json.loads(out.read_text())["cells"]}
    expected = set()
    for pair in pairs():
        for workload in ("W1", "W1p", "W2", "W3"):
            if workload == "W1p" and pair.client == "c":
                continue
            expected |= {(pair.key, workload, size) for size in SIZES}
        expected |= {(pair.key, "W4", 64), (pair.key, "W0", 64)}
    assert set(cells) == expected
    for key, cell in cells.items():
        assert cell["rounds"] == 1, key
        assert cell["cpu_us"] is not None and cell["cpu_us"] >= 0, key
        if key[1] != "W0":
            assert cell["msgs_s"] > 0, key
    assert cells[("C -> C [shm]", "W1", 64)]["speed_ratio"] == 1.0


def test_checks_reject() -> None:
    """The driver's checks fail short counts, failed cells and corrupt payloads."""
    good = {"workload": "W2", "size": 64, "count": 5, "elapsed": 0.1, "ok": True}
    checkResults(["W2:64:5"], [good])
    with pytest.raises(BenchError):
        checkResults(["W2:64:5"], [dict(good, count=4)])
    with pytest.raises(BenchError):
        checkResults(["W2:64:5"], [dict(good, ok=False)])
    with pytest.raises(BenchError):
        checkResults(["W2:64:5", "W3:64:5"], [good])
    data = bytearray(payload(7, 1024))
    # bytes, and a view as a zero-copy server gets it
    assert payloadOk(bytes(data), 7) and not payloadOk(bytes(data), 8)
    assert payloadOk(memoryview(data), 7) and not payloadOk(memoryview(data), 8)
    assert b"".join(payloadParts(7, 1024)) == data
    data[500] ^= 1
    assert not payloadOk(bytes(data), 7)
    assert not payloadOk(memoryview(data), 7)
    assert not payloadOk(memoryview(data)[:-1], 7)


class _Corrupting(ServiceHandlers):
    def messageReceived(self, connection: Any, msgId: int, data: bytes) -> Any:
        return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest_twisted.ensureDeferred
async def test_c_client_detects_corruption(reactor: Any, serviceName: str) -> None:
    """The C bench client fails a cell whose echoes come back altered."""
    _, client = buildC()
    service = txqb.listen(reactor, serviceName, _Corrupting(), transport="shm")
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            str(client), [serviceName, str(os.getpid()), "W1:64:3"], env=os.environ
        )
    finally:
        await service.stopListening()
    assert code == 1, err
    line = json.loads(out.splitlines()[0])
    assert line["workload"] == "W1" and line["ok"] is False
