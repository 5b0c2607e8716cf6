"""
Shared files under ``/dev/shm``, created the safe way.

The rules come from libqb's CVE-2019-12779 fix: every connection gets a
fresh directory with an unpredictable name created atomically; files are
created inside it with ``O_CREAT|O_EXCL`` (never following or reusing a
name someone planted) and removed through a directory fd with
``unlinkat``, so nothing outside that directory is ever touched.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import string
import weakref
from typing import Optional, Union

from txqb._posix.libc import libc as _libc

__all__ = [
    "SHM_DIR",
    "PrivateDirectory",
    "createSharedFile",
    "openSharedFile",
    "mapFile",
    "MirroredMap",
    "mapRingData",
]

SHM_DIR = "/dev/shm"
"""Where libqb keeps per-connection files."""

_ALPHABET = string.ascii_letters + string.digits
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _chown(path: str | int, uid: int, gid: int, dirFd: Optional[int] = None) -> None:
    # libqb ignores chown failures (a non-root server cannot give files
    # away); so does txqb, for the same reason.
    try:
        if isinstance(path, int):
            os.fchown(path, uid, gid)
        else:
            os.chown(path, uid, gid, dir_fd=dirFd, follow_symlinks=False)
    except PermissionError:
        pass


class PrivateDirectory:
    """
    One connection's directory, e.g. ``/dev/shm/qb-1-2-7-Ab3dE9``.

    Created 0700 by ``mkdir`` (atomic, fails if the name exists), then
    opened as a directory fd through which every file is created and
    removed, then opened to the group (0770) once it is ours.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._files: list[str] = []

    @classmethod
    def create(
        cls,
        prefix: str,
        uid: int,
        gid: int,
        parent: str = SHM_DIR,
        attempts: int = 100,
    ) -> PrivateDirectory:
        """
        Make a new directory ``parent/prefix`` plus six random characters.

        @raise OSError: e.g. ``ENOSPC``, or ``EEXIST`` after ``attempts``
            collisions.
        """
        import secrets  # here: hashlib is slow to import for clients

        for _ in range(attempts):
            suffix = "".join(secrets.choice(_ALPHABET) for _ in range(6))
            path = os.path.join(parent, prefix + suffix)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except BaseException:
                os.rmdir(path)
                raise
            os.fchmod(fd, 0o770)
            _chown(fd, uid, gid)
            return cls(path, fd)
        raise OSError(errno.EEXIST, f"no free name for {prefix}XXXXXX in {parent}")

    def chown(self, uid: int, gid: int) -> None:
        """Hand the directory to ``uid``/``gid`` (ignored without privilege)."""
        _chown(self.fd, uid, gid)

    def createFile(self, name: str, size: int, uid: int, gid: int, mode: int) -> int:
        """Create ``name`` inside the directory; see L{createSharedFile}."""
        fd = createSharedFile(self.fd, name, size, uid, gid, mode)
        self._files.append(name)
        return fd

    def pathOf(self, name: str) -> str:
        """The absolute path of ``name`` inside the directory."""
        return os.path.join(self.path, name)

    def remove(self) -> None:
        """
        Unlink the files this directory made, then the directory itself.

        Safe to call more than once; files the peer already removed are
        skipped.  The directory is removed only when empty, as libqb does.
        """
        if self.fd < 0:
            return
        for name in self._files:
            try:
                os.unlink(name, dir_fd=self.fd)
            except FileNotFoundError:
                pass
        self._files.clear()
        os.close(self.fd)
        self.fd = -1
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def createSharedFile(dirFd: int, name: str, size: int, uid: int, gid: int, mode: int) -> int:
    """
    Create a file of ``size`` bytes inside the directory ``dirFd``.

    Exclusive (``EEXIST`` if anything, a symlink included, is already
    there), never following links, created 0600 and then given ``mode`` and
    ``uid``/``gid`` explicitly so that the umask does not matter.  Space is
    reserved with ``posix_fallocate`` so that a full ``/dev/shm`` fails here
    with ``ENOSPC`` instead of with ``SIGBUS`` on first touch of the map.

    @return: the open file descriptor; the caller maps and closes it.
    """
    fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dirFd)
    try:
        os.ftruncate(fd, size)
        while True:
            try:
                os.posix_fallocate(fd, 0, size)
                break
            except InterruptedError:
                continue
        _chown(fd, uid, gid)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dirFd)
        raise
    return fd


def openSharedFile(path: str, minimumSize: int) -> int:
    """
    Open a file a server created, without resizing it.

    libqb's C client ``ftruncate``s what it opens; a txqb client never
    does, so it can never shrink a live server's file under it.  A file
    smaller than ``minimumSize`` is refused instead of being mapped (a map
    past the end of a file raises ``SIGBUS`` on access).

    @raise OSError: ``EBADMSG`` for a file too small.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        size = os.fstat(fd).st_size
        if size < minimumSize:
            raise OSError(
                errno.EBADMSG, f"{path} is {size} bytes, expected at least {minimumSize}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def mapFile(fd: int, size: int) -> mmap.mmap:
    """Map the first ``size`` bytes of ``fd`` shared and writable."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = 0x4000


def _mmap(address: Optional[int], size: int, prot: int, flags: int, fd: int) -> int:
    got = _libc.mmap(address, size, prot, flags, fd, 0)
    if got is None or got == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"mmap: {os.strerror(code)}")
    return int(got)


def _munmap(address: int, size: int) -> None:
    _libc.munmap(address, size)


class MirroredMap:
    """
    A shared file of ``size`` bytes mapped twice, back to back, as libqb
    maps a ring's data: a chunk that runs past the end of the file goes on
    at its start in the second mapping, so every chunk is one contiguous
    slice, read and written with one copy and no wrap-around pieces.

    The memory is reached through L{view} and the views sliced from it.
    It stays mapped while any of them exists: the mapping belongs to a
    ctypes array that every view references, and it is unmapped when that
    array is freed.  So a view kept too long reads a live mapping, never
    unmapped memory (a crash), which a plain ``mmap`` guarantees by
    refusing to close instead.
    """

    def __init__(self, fd: int, size: int) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"a mirrored map needs whole pages, not {size} bytes")
        # Reserve both halves first, so the fixed mappings replace only
        # address space this object owns.
        base = _mmap(None, 2 * size, _PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)
        try:
            for half in (base, base + size):
                _mmap(half, size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_SHARED | _MAP_FIXED, fd)
        except BaseException:
            _munmap(base, 2 * size)
            raise
        owner = (ctypes.c_char * (2 * size)).from_address(base)
        weakref.finalize(owner, _munmap, base, 2 * size)
        self.size = size
        """Bytes in the file (the view is twice as long)."""
        self.view: memoryview = memoryview(owner).cast("B")
        """Both mappings, ``2 * size`` bytes."""

    def close(self) -> None:
        """Drop this object's view; unmapped once no view is left."""
        self.view.release()


RingData = Union[mmap.mmap, MirroredMap]


def mapRingData(fd: int, size: int) -> tuple[RingData, memoryview]:
    """
    Map a ring's data file: mirrored when it is whole pages (as libqb
    makes it), else plainly (the ring then copies chunks that wrap).
    """
    if size > 0 and size % mmap.PAGESIZE == 0:
        mirrored = MirroredMap(fd, size)
        return mirrored, mirrored.view
    plain = mapFile(fd, size)
    return plain, memoryview(plain)
