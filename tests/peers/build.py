"""Build the C reference peers (real libqb server, client and the
filesystem-socket LD_PRELOAD shim) used by the interoperability tests.

Usage::

    from tests.peers.build import build, PeersUnavailable
    peers = build(pathlib.Path("/some/dir"))
    subprocess.run([peers.server, "svcname"])

The sources live next to this module.  Binaries are rebuilt only when they
are missing or older than their source (or the shared header).  Anything that prevents building
(no gcc, no libqb headers or library) raises :class:`PeersUnavailable` with
gcc's diagnostics, so callers can decide between skipping and failing.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["Peers", "PeersUnavailable", "build"]

_SOURCE_DIR = pathlib.Path(__file__).resolve().parent
_CFLAGS = ["-O2", "-Wall", "-Werror"]
_LIBQB_HEADERS = ("qb/qbipcs.h", "qb/qbipcc.h", "qb/qbloop.h")
_COMPILE_TIMEOUT_S = 120


class PeersUnavailable(Exception):
    """The peers cannot be built on this machine (message says why)."""


@dataclass(frozen=True)
class Peers:
    """Paths of the built peer binaries."""

    server: pathlib.Path
    client: pathlib.Path
    fsShim: pathlib.Path
    rbWriter: pathlib.Path


@dataclass(frozen=True)
class _Target:
    source: str
    output: str
    extraFlags: tuple[str, ...]
    libs: tuple[str, ...]


_TARGETS = (
    _Target("qbserver.c", "qbserver", (), ("-lqb",)),
    _Target("qbclient.c", "qbclient", (), ("-lqb",)),
    _Target("fsflag_shim.c", "fsflag_shim.so", ("-shared", "-fPIC"), ("-ldl",)),
    _Target("qbrbwriter.c", "qbrbwriter", (), ("-lqb",)),
)


def _findCompiler() -> str:
    compiler = os.environ.get("CC") or "gcc"
    path = shutil.which(compiler)
    if path is None:
        raise PeersUnavailable(
            f"C compiler {compiler!r} not found on PATH; install gcc "
            "(Debian: apt-get install gcc libqb-dev)"
        )
    return path


def _runCompiler(args: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeersUnavailable(f"cannot run {args[0]} for {what}: {e}") from e
    if result.returncode != 0:
        raise PeersUnavailable(
            f"building {what} failed (exit {result.returncode}); "
            "are libqb-dev and gcc installed?\n"
            f"command: {' '.join(args)}\n"
            f"{result.stderr.strip()}"
        )


def _checkLibqb(compiler: str, outdir: pathlib.Path) -> None:
    """Fail early, with a readable message, if libqb is not usable.

    Compiling one tiny program that includes the headers and links against
    libqb distinguishes "libqb missing" from a genuine error in a peer.
    """
    probe = outdir / "libqb_probe.c"
    includes = "".join(f"#include <{h}>\n" for h in _LIBQB_HEADERS)
    probe.write_text(
        includes + "int main(void) { qb_loop_t *l = qb_loop_create();\n"
        "  if (l) qb_loop_destroy(l);\n  return 0; }\n"
    )
    try:
        _runCompiler(
            [compiler, *_CFLAGS, "-o", str(outdir / "libqb_probe"), str(probe), "-lqb"],
            "the libqb probe (libqb headers or library missing)",
        )
    finally:
        probe.unlink(missing_ok=True)
        (outdir / "libqb_probe").unlink(missing_ok=True)


def _isFresh(output: pathlib.Path, source: pathlib.Path) -> bool:
    # The peers' shared header counts as part of every source.
    try:
        built = output.stat().st_mtime
        return all(
            built > p.stat().st_mtime for p in (source, _SOURCE_DIR / "peer_common.h")
        )
    except FileNotFoundError:
        return False


def build(outdir: pathlib.Path) -> Peers:
    """Compile the peers into ``outdir`` (created if needed) and return
    their paths.  Up-to-date binaries are reused."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    stale = [
        t
        for t in _TARGETS
        if not _isFresh(outdir / t.output, _SOURCE_DIR / t.source)
    ]
    if stale:
        compiler = _findCompiler()
        _checkLibqb(compiler, outdir)
        for target in stale:
            source = _SOURCE_DIR / target.source
            output = outdir / target.output
            # Build under a temporary name and rename, so that an
            # interrupted or failed build never leaves a "fresh" binary.
            partial = output.with_name(output.name + ".tmp")
            _runCompiler(
                [
                    compiler,
                    *_CFLAGS,
                    *target.extraFlags,
                    "-o",
                    str(partial),
                    str(source),
                    *target.libs,
                ],
                target.source,
            )
            os.replace(partial, output)

    return Peers(
        server=outdir / "qbserver",
        client=outdir / "qbclient",
        fsShim=outdir / "fsflag_shim.so",
        rbWriter=outdir / "qbrbwriter",
    )
