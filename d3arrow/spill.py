"""Values on disk: one unnamed file per spilled value, read back as a memory-mapped view.

A spilled file never has a name (``O_TMPFILE``; where the file system lacks it, it is
unlinked the moment it is created) and lives as long as its descriptor: a worker killed with
``kill -9`` leaves nothing in its directory, as its shared store leaves nothing in /dev/shm.

Arrays and Arrow tables are written in their Arrow IPC form straight from their buffers
(one write, no copy made to write them); other values as their pickle-5 frames. Reading
maps the file: the value is a read-only view of the page cache, which the kernel may drop
and read again, so a spilled value that a task or a reader uses is never copied back into
the worker's memory. A co-located reader opens the same file through ``/proc/PID/fd`` and
maps it too.
"""

import errno
import mmap
import os
import tempfile
import threading
from typing import Any

import pyarrow as pa

from .errors import SpillError
from .serialize import (Serialized, arrow_meta, deserialize, nbytes, serialize,
                        write_arrow_stream)

ALIGNMENT = 64  # each payload starts on this boundary in its file, as Arrow buffers like


class SpillDirectory:
    """Where a worker writes the values it spills.

    Parameters
    ----------
    path : str, optional
        A directory (default: the system's temporary directory). It must exist and be
        writable; nothing is ever left in it.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.abspath(path or tempfile.gettempdir())
        if not os.path.isdir(self.path):
            raise ValueError(f"local directory {self.path!r} does not exist")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ValueError(f"local directory {self.path!r} is not writable")

    def write(self, value: Any) -> "SpilledValue":
        """Write ``value`` to a new unnamed file; its :class:`SpilledValue`.

        Raises
        ------
        SpillError
            The file cannot be written (the disk is full, say); nothing is left behind.
        TypeError
            The value cannot be serialized.
        """
        fd = self._new_file()
        try:
            if isinstance(value, (pa.Table, pa.RecordBatch)):
                meta, payloads, size = _write_arrow(fd, value)
            else:
                meta, payloads, size = _write_frames(fd, serialize(value))
        except OSError as e:
            os.close(fd)
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise SpillError(f"cannot spill a {type(value).__name__} of {nbytes(value)} bytes "
                             f"to {self.path}: {reason}") from e
        except BaseException:
            os.close(fd)
            raise
        return SpilledValue(fd, meta, payloads, size)

    def _new_file(self) -> int:
        try:
            return os.open(self.path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise SpillError(f"cannot create a spill file in {self.path}: "
                                 f"{os.strerror(e.errno)}") from e
        fd, name = tempfile.mkstemp(prefix="d3arrow-spill-", dir=self.path)
        os.unlink(name)
        return fd


class SpilledValue:
    """A value held in an unnamed file: ``load()`` maps it and gives a view of the value.

    Compute threads load while the event loop may close: the descriptor is used and closed
    under a lock, so a load never maps a closed descriptor, or its number reused for
    another value's file. It is a handle of this process, never pickled."""

    __slots__ = ("fd", "meta", "payloads", "nbytes", "_lock", "__weakref__")

    def __init__(self, fd: int, meta: dict, payloads: list, nbytes: int) -> None:
        self.fd, self.meta, self.payloads, self.nbytes = fd, meta, payloads, nbytes
        self._lock = threading.Lock()

    def __reduce__(self):
        raise TypeError("a spilled value's file handle belongs to its process and cannot "
                        "be pickled")

    def load(self) -> Any:
        """A view of the value. Raises SpillError if the file was dropped meanwhile."""
        with self._lock:  # the mapping holds its own reference to the file once made
            if self.fd < 0:
                raise SpillError("the spilled value was dropped while it was read")
            return _view(self.fd, self.meta, self.payloads, self.nbytes)

    def ref_meta(self) -> dict:
        """How a process on this host opens it: see :func:`open_spilled`."""
        with self._lock:
            if self.fd < 0:
                raise SpillError("the spilled value was dropped while it was asked for")
            return {"kind": "spilled", "path": f"/proc/{os.getpid()}/fd/{self.fd}",
                    "inode": os.fstat(self.fd).st_ino, "payloads": self.payloads,
                    "size": self.nbytes, "inner": self.meta}

    def close(self) -> None:
        """Drop the file (views already made keep their mapping)."""
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def adopt_spilled(ref_meta: dict) -> SpilledValue:
    """Hold the file a co-located worker spilled a value to, as our own: it lives until
    both have dropped it, and nothing is written again.

    Raises
    ------
    SpillError
        The owner has dropped the file (or died): the descriptor is gone or now names
        another file.
    """
    try:
        fd = os.open(ref_meta["path"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SpillError(f"spilled value at {ref_meta['path']} is gone: "
                         f"{os.strerror(e.errno)}") from None
    if os.fstat(fd).st_ino != ref_meta["inode"]:
        os.close(fd)
        raise SpillError(f"spilled value at {ref_meta['path']} is gone (its descriptor "
                         f"names another file now)")
    return SpilledValue(fd, ref_meta["inner"], ref_meta["payloads"], ref_meta["size"])


def open_spilled(ref_meta: dict) -> Any:
    """The value a co-located worker spilled, as a view of its file (see
    :func:`adopt_spilled` for the errors)."""
    held = adopt_spilled(ref_meta)
    try:
        return held.load()
    finally:
        held.close()  # the mapping keeps the file


def _view(fd: int, meta: dict, payloads: list, nbytes: int) -> Any:
    if nbytes == 0:
        return deserialize(Serialized(meta, [pa.py_buffer(b"") for _ in payloads]))
    mapped = pa.py_buffer(mmap.mmap(fd, nbytes, prot=mmap.PROT_READ))
    return deserialize(Serialized(meta, [mapped.slice(start, length)
                                         for start, length in payloads]))


def _write_frames(fd: int, serialized: Serialized) -> tuple[dict, list, int]:
    """Each payload's parts one after the other, each payload aligned: ``(meta, [(start,
    length)], size)``."""
    offsets, end = [], 0
    with open(fd, "wb", buffering=0, closefd=False) as file:
        for payload in serialized.payloads:
            start = -end % ALIGNMENT + end
            if start != end:
                file.write(bytes(start - end))
            end = start
            for part in payload:
                end += _write_all(file, part)
            offsets.append((start, end - start))
    return serialized.meta, offsets, end


def _write_arrow(fd: int, data: Any) -> tuple[dict, list, int]:
    """An Arrow table as an IPC stream, written from its own buffers."""
    with pa.OSFile(f"/proc/self/fd/{fd}", "wb") as sink:
        write_arrow_stream(sink, data)
        size = sink.tell()
    return arrow_meta(data), [(0, size)], size


def _write_all(file: Any, part: Any) -> int:
    view = memoryview(part).cast("B")
    written = 0
    while written < len(view):
        written += file.write(view[written:])
    return written
