"""
The session leak gate in conftest.py can fail: a run whose test leaks an
fd, a ``/dev/shm`` entry, a socket and a child process reports each of
them and exits non-zero, while a clean run passes.  Each case is a real
pytest run in a subprocess, using this suite's conftest.py as a plugin.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

HERE = pathlib.Path(__file__).resolve().parent

LEAKY = '''
import os
import socket
import subprocess

held = []

def test_leaks():
    tag = f"txqbtest{os.getpid()}n"
    open(f"/dev/shm/qb-{tag}-leak", "w").close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"/tmp/{tag}-leak")
    held.append(sock)
    child = subprocess.Popen(["sleep", "60"])
    print(f"CHILD {child.pid}")
'''

CLEAN = '''
import subprocess

def test_clean():
    subprocess.run(["true"], check=True)
'''


def _runPytest(tmp: pathlib.Path, source: str) -> subprocess.CompletedProcess[str]:
    test = tmp / "test_subject.py"
    test.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-s", "-p", "no:cacheprovider", str(test)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_gateNamesEveryLeak(tmp_path: pathlib.Path) -> None:
    result = _runPytest(tmp_path, LEAKY)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    gate = [line.split("leak gate:", 1)[1] for line in out.splitlines() if "leak gate:" in line]
    assert any("/dev/shm entries left" in line and "-leak" in line for line in gate), out
    assert any("/tmp sockets left" in line for line in gate), out
    assert any("sockets still bound" in line for line in gate), out
    assert any("fds open" in line for line in gate), out
    (child,) = [int(line.split()[1]) for line in out.splitlines() if line.startswith("CHILD ")]
    assert any("child processes left" in line and f"{child} (sleep 60)" in line for line in gate), out
    # The gate tidied up after reporting.
    assert not _alive(child)
    assert not [n for n in os.listdir("/tmp") if n.endswith("-leak") and "txqbtest" in n and str(child) in n]


def test_cleanRunPasses(tmp_path: pathlib.Path) -> None:
    result = _runPytest(tmp_path, CLEAN)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "leak gate" not in out
