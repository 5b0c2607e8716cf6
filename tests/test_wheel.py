"""
txqb as users get it: a wheel built from the source tree, installed into a
fresh virtual environment, provides the ``twistd qbipc`` plugin and the
``txqb`` command, and both work from there.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.internet import utils

from test_twistd import Twistd

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """
    A fresh venv holding only the wheel; Twisted and zope.interface come
    from the test environment through a .pth file (which adds that
    site-packages but not its editable checkout of txqb).
    """
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "_build", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(source)],
        check=True, timeout=300,
    )
    (wheel,) = (base / "dist").glob("txqb-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    pathlib.Path(purelib, "txqb-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300,
    )
    return venv


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env


def test_installedFromWheel(installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """txqb comes from the venv, and twistd lists qbipc from there."""
    python = str(installed / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import txqb, twisted.plugins.txqb_qbipc as p; print(txqb.__file__); print(p.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=_env(),
    ).stdout.split()
    assert all(path.startswith(str(installed)) for path in where), where
    out = subprocess.run(
        [python, "-c", _TWISTD, "--help"], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "qbipc" in out.stdout
    assert (installed / "bin" / "txqb").exists()


@pytest_twisted.ensureDeferred
async def test_runsFromWheel(reactor: Any, installed: pathlib.Path, serviceName: str, tmp_path: pathlib.Path) -> None:
    """The installed plugin serves echo; the installed txqb command calls it."""
    python = str(installed / "bin" / "python")
    server = Twistd(
        reactor, "--service", f"echo={serviceName}", "--transport", "shm",
        executable=python, argv0=[python, "-c", _TWISTD], cwd=str(tmp_path),
    )
    server.env = _env()
    async with server:
        out, err, code = await utils.getProcessOutputAndValue(
            str(installed / "bin" / "txqb"), ["call", serviceName, "--data", "from the wheel"],
            env=_env(), path=str(tmp_path),
        )
        assert (out, err, code) == (b"response id=0 error=0 size=14 text=from the wheel\n", b"", 0)
    assert server.proto.exitCode == 0
