"""
The documentation works: every example in docs/examples/ runs and prints
exactly the output stored next to it (NAME.out), and Sphinx builds the
docs without a warning.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))


def _env() -> dict[str, str]:
    # Run the checkout's txqb, whatever is installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_examplesHaveOutputs() -> None:
    """Every example has its expected output, and every output its example."""
    assert EXAMPLES, "no examples found"
    outputs = {p.stem for p in (DOCS / "examples").glob("*.out")}
    assert outputs == {p.stem for p in EXAMPLES}


@pytest.mark.parametrize(
    "number, example", list(enumerate(EXAMPLES)), ids=[p.stem for p in EXAMPLES]
)
def test_example(number: int, example: pathlib.Path) -> None:
    """The example exits 0 and prints what its .out file says."""
    name = f"txqbtest{os.getpid()}doc{number}"
    result = subprocess.run(
        [sys.executable, str(example), name],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == example.with_suffix(".out").read_text(), result.stderr


def test_sphinxBuild(tmp_path: pathlib.Path) -> None:
    """The docs build with warnings as errors."""
    try:
        import sphinx  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Sphinx is not installed under CI")
        pytest.skip("Sphinx is not installed (pip install txqb[dev])")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
