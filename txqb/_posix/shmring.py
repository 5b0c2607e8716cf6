"""
The client- and server-side handling of libqb's shared files, with no
event loop: mapping a ring's two files, and removing what a peer left.

Both txqb's Twisted transports and its blocking client use these.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import List, Optional, Tuple

from txqb._posix.files import (
    SHM_DIR,
    PrivateDirectory,
    RingData,
    mapFile,
    mapRingData,
    openSharedFile,
)
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.ring import (
    DATA_PATH,
    HEADER_FILE_SIZE,
    HEADER_STRUCT_SIZE,
    REF_COUNT,
    SEMAPHORE,
    Ring,
    RingError,
    dataFileSize,
    initializeHeader,
    loadInt,
    loadWord,
    readPath,
    storeWord,
)

__all__ = ["SharedRing", "removeIfOrphaned", "removeControlFile"]


class SharedRing:
    """A ring in two shared files, mapped; owns the maps and the semaphore."""

    def __init__(self, maps: List[RingData], ring: Ring,
                 semaphore: SharedSemaphore,
                 views: List[memoryview]) -> None:
        self._maps = maps
        self._views = views
        self.ring = ring
        self.semaphore = semaphore
        self.header = views[0]

    @classmethod
    def create(cls, directory: PrivateDirectory, base: str, maxMessageSize: int,
               uid: int, gid: int, mode: int) -> SharedRing:
        """
        Create a ring as libqb's server does: header 8252 bytes, data
        ``round_up(max + 13, page)``, absolute paths inside the header,
        a process-shared semaphore, ``ref_count`` 1.
        """
        dataSize = dataFileSize(maxMessageSize, mmap.PAGESIZE)
        name = os.path.basename(base)
        maps: List[RingData] = []
        views: List[memoryview] = []
        try:
            fd = directory.createFile(name + "-header", HEADER_FILE_SIZE, uid, gid, mode)
            try:
                header = mapFile(fd, HEADER_FILE_SIZE)
            finally:
                os.close(fd)
            maps.append(header)
            views.append(memoryview(header))
            fd = directory.createFile(name + "-data", dataSize, uid, gid, mode)
            try:
                data, view = mapRingData(fd, dataSize)
            finally:
                os.close(fd)
            maps.append(data)
            views.append(view)
        except BaseException:
            for v in views:
                v.release()
            for m in maps:
                m.close()
            raise
        initializeHeader(views[0], dataSize, base + "-header", base + "-data")
        semaphore = SharedSemaphore(header, SEMAPHORE)
        semaphore.initialize()
        return cls(maps, Ring(views[0], views[1], semaphore), semaphore, views)

    @classmethod
    def attach(cls, base: str) -> SharedRing:
        """
        Open a ring a server created, as libqb's client does, except that
        nothing is truncated: the header's own paths and sizes are checked
        against the files instead, so a hostile or mismatched server cannot
        make txqb map past the end of a file (``SIGBUS``).
        """
        if not os.path.isabs(base):
            raise OSError(errno.EBADMSG, f"server named ring {base!r}")
        maps: List[RingData] = []
        views: List[memoryview] = []
        semaphore: Optional[SharedSemaphore] = None
        try:
            fd = openSharedFile(base + "-header", HEADER_STRUCT_SIZE)
            try:
                header = mapFile(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            maps.append(header)
            views.append(memoryview(header))
            words = loadWord(views[0], 8)
            fd = openSharedFile(readPath(views[0], DATA_PATH), words * 4)
            try:
                data, view = mapRingData(fd, words * 4)
            finally:
                os.close(fd)
            maps.append(data)
            views.append(view)
            semaphore = SharedSemaphore(header, SEMAPHORE)
            ring = Ring(views[0], views[1], semaphore)
        except BaseException as e:
            # Unwind in reverse: pointers into the maps before the maps.
            if semaphore is not None:
                semaphore.release()
            for view in views:
                view.release()
            for m in maps:
                m.close()
            if isinstance(e, RingError):
                raise OSError(e.errno, str(e)) from None
            raise
        storeWord(views[0], REF_COUNT, loadInt(views[0], REF_COUNT) + 1)
        return cls(maps, ring, semaphore, views)

    def detach(self) -> None:
        """Drop this client's reference (libqb: 1, then 0), then unmap."""
        if self._views:
            storeWord(self.header, REF_COUNT, 0)
        self.close()

    def close(self) -> None:
        """Unmap (the files are removed with their directory)."""
        if self._views:
            self.ring.release()
        self.semaphore.release()
        for view in self._views:
            view.release()
        for m in self._maps:
            m.close()
        self._maps = []
        self._views = []


def _isZombie(pid: int) -> bool:
    # A killed server is a zombie until its parent reaps it, which may be
    # after the client noticed: it will never touch its files again.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def removeIfOrphaned(names: Tuple[str, ...]) -> bool:
    """
    After a server died, remove the ring files it can no longer remove,
    as libqb's client does.  Only files inside a ``qb-*`` directory of
    /dev/shm are touched, and only when that directory's owner process
    (the server pid in its name) is gone.

    @return: False while that process still lives, True otherwise.
    """
    directory = os.path.dirname(names[0])
    base = os.path.basename(directory)
    if os.path.dirname(directory) != SHM_DIR or not base.startswith("qb-"):
        return True
    try:
        serverPid = int(base.split("-")[1])
        if serverPid == os.getpid():
            return True  # our own server tidies its files
        os.kill(serverPid, 0)
        if not _isZombie(serverPid):
            return False
    except (ValueError, IndexError):
        return True
    except PermissionError:
        return True
    except ProcessLookupError:
        pass
    for name in names:
        for suffix in ("-header", "-data"):
            try:
                os.unlink(name + suffix)
            except OSError:
                pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
    return True


def removeControlFile(path: str) -> None:
    """
    Remove a socket-transport control file and its directory, as libqb's
    ``qb_ipcc_disconnect`` does.

    The path came from the server: it is removed only where libqb puts
    such files (a ``qb-*`` directory directly in /dev/shm), so that a
    hostile server cannot make a privileged client delete anything else.
    """
    directory = os.path.dirname(path)
    if os.path.dirname(directory) != SHM_DIR or not os.path.basename(
        directory
    ).startswith("qb-"):
        return
    for remove, target in ((os.unlink, path), (os.rmdir, directory)):
        try:
            remove(target)
        except OSError:
            pass
