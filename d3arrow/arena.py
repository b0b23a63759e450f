"""A region of shared memory and its allocator: the memory side of the shared store.

The region is an ``os.memfd_create`` file: it never appears in /dev/shm, is not bound by
/dev/shm's size, and the kernel frees it when the last file descriptor and mapping are gone,
so no crash can leak it. Pages are reserved with ``fallocate`` before use (a full machine
gives a clear error, never SIGBUS) and faulted in ahead of need by a background thread,
because touching fresh shared pages costs about 3 s per GiB here, reusing them a memcpy.

An allocation is a mutable ``pyarrow.Buffer`` over a private numpy view of part of the
region. The space returns to the free list when that view is garbage collected. Everything
built on the buffer holds the view: Python wrappers through the buffer, Arrow's C++ arrays
and tensors through the buffer protocol export the buffer was made from. So a value's memory
lives exactly as long as the value (or a reader's pin on it). The view itself is never handed
out: numpy points arrays derived from a view at the root of the chain, which would let the
view die while its memory is in use.
"""

import bisect
import collections
import ctypes
import itertools
import logging
import mmap
import os
import threading
import time
import weakref

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

ALIGNMENT = 64
CHUNK = 64 * 2**20  # reserve and fault in this much at a time
PREFAULT_AHEAD = 256 * 2**20  # at most this much faulted in beyond the highest allocation
TRIM_DELAY = 2.0  # memory freed is given back once not needed for this many seconds
MADV_POPULATE_WRITE = 23
MADV_REMOVE = 9  # free a range of shared pages and their backing store
RAW_HEADER = 4096  # room in front of a raw allocation's data for the value's metadata

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class ArenaFull(MemoryError):
    """No free range large enough, or the machine refused more memory."""


class Arena:
    """A memory region with a first-fit allocator.

    Parameters
    ----------
    capacity : int
        Bytes of address space; memory is reserved as allocations reach it.
    name : str
        Shown in ``/proc/PID/fd`` as ``/memfd:NAME``.
    shared : bool, default True
        A memfd other processes can map; else private anonymous memory (which may get huge
        pages), still worth having for receiving into memory that is faulted in and reused.
    tight : bool, default False
        Hold no memory beyond the allocations (a worker with a memory limit): no faulting
        in ahead, and a freed allocation's pages go back to the system at once.
    """

    def __init__(self, capacity, name="d3arrow-store", *, shared=True, tight=False):
        self.capacity = _round_up(capacity, mmap.PAGESIZE)
        self.fd = -1
        if not shared:
            self._mmap = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._mmap.madvise(mmap.MADV_HUGEPAGE)
        else:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, self.capacity)
                self._mmap = mmap.mmap(self.fd, self.capacity, flags=mmap.MAP_SHARED)
            except BaseException:
                os.close(self.fd)
                raise
        self.memory = np.frombuffer(self._mmap, dtype=np.uint8)
        self.address = self.memory.ctypes.data
        self._lock = threading.Lock()
        self._free = [(0, self.capacity)]  # sorted (offset, size)
        self._used = 0
        self._reserved = 0  # fallocated and faulted in: [0, _reserved)
        self._high = 0  # the highest end of any allocation now
        # the highest allocation end in this window of TRIM_DELAY seconds, and the last one
        self._peak, self._last_peak, self._window_at = 0, 0, 0.0
        self._growing = False  # the last allocation reached beyond the recent peaks
        self._grown_from = None  # the recent peak when the store began growing beyond it
        self._reserve_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._blocks = {}  # id -> weakref to the allocation
        self._id_at = {}  # offset -> id
        self._raw = {}  # data address -> _Raw, for allocate_raw()
        self._raw_frees = collections.deque()  # raw addresses freed, not yet given back
        self._prefault_wanted = threading.Event()
        self._closed = False
        # Private memory gets no head start: it serves receives, whose pages the kernel
        # writes anyway, and faulting ahead would only add to the process's footprint.
        self.tight = tight and shared
        self._prefault_ahead = shared and not tight
        if self._prefault_ahead:
            # the head start is faulted in here, before the worker serves: faulted in by
            # the background thread it took a core (20-35 ms) while the first calls ran,
            # and a caller and its worker then shared the other one (an apply 130 us
            # instead of 55 for the first 100-200 calls, in 10 cluster starts of 12)
            try:
                self._reserve_ahead()
            except OSError as e:
                logger.warning("could not fault in shared memory ahead of use: %s", e)
            self._prefaulter = threading.Thread(target=self._prefault_loop, daemon=True,
                                                name="d3arrow-prefault")
            self._prefaulter.start()

    @property
    def used(self):
        return self._used

    @property
    def reserved(self):
        return self._reserved

    def allocate(self, size):
        """A mutable Arrow buffer of ``size`` bytes of the region; its id is ``block_id(buffer)``.

        Raises
        ------
        ArenaFull
            No free range of that size, or the machine cannot back it.
        """
        offset, need = self._take(size)
        view = self.memory[offset:offset + size]
        block_id = next(self._ids)
        with self._lock:
            self._blocks[block_id] = weakref.ref(view)
            self._id_at[offset] = block_id
        weakref.finalize(view, self._release, offset, need, block_id)
        return pa.py_buffer(view)

    def allocate_raw(self, size):
        """The address of ``size`` bytes for an array's data (numpy's allocator, see
        :mod:`d3arrow.numpy_allocator`), or None when there is no room. ``RAW_HEADER``
        bytes in front of it are ours, for the metadata of the value the array may become
        (:meth:`adopt_raw`). Freed by :meth:`free_raw`."""
        try:
            offset, need = self._take(size + RAW_HEADER, faulted_in=True)
        except ArenaFull:
            return None
        address = self.address + offset + RAW_HEADER
        self._raw[address] = _Raw(offset, need)
        return address

    def holds_raw(self, address):
        return address in self._raw

    def raw_size(self, address):
        return self._raw[address].need - RAW_HEADER

    def adopt_raw(self, owner, address, nbytes, metadata):
        """Make the raw allocation holding ``nbytes`` at ``address`` a block readers can pin,
        with ``metadata`` written just in front of the data: ``(block id, offset of the
        metadata)``, or None where it cannot be (not a raw allocation, metadata too long,
        or the block already is a value with other metadata). ``owner`` keeps the memory
        alive (the array owning it); the block lives as long as it does."""
        raw = self._raw.get(address)
        if raw is None or len(metadata) > RAW_HEADER or nbytes > raw.need - RAW_HEADER:
            return None
        start = raw.offset + RAW_HEADER - len(metadata)
        with self._lock:
            if raw.block_id is not None:  # the same array stored twice
                return (raw.block_id, start) if raw.metadata == bytes(metadata) else None
            self.memory[start:start + len(metadata)] = np.frombuffer(metadata, dtype=np.uint8)
            raw.block_id, raw.metadata = next(self._ids), bytes(metadata)
            self._blocks[raw.block_id] = weakref.ref(owner)
            self._id_at[raw.offset] = raw.block_id
        return raw.block_id, start

    def free_raw(self, address):
        """Give a raw allocation back. numpy frees from any thread, also inside a garbage
        collection while this thread holds our lock: then it waits for the next call."""
        self._raw_frees.append(address)
        if self._lock.acquire(blocking=False):
            self._lock.release()
            self._give_back_raw()

    def _give_back_raw(self):
        while self._raw_frees:
            try:
                address = self._raw_frees.popleft()
            except IndexError:  # another thread took the last one
                return
            raw = self._raw.pop(address)
            self._release(raw.offset, raw.need, raw.block_id)

    def _take(self, size, *, faulted_in=False):
        """``(offset, length)`` of a new allocation of at least ``size`` bytes, backed.
        ``faulted_in``: only from memory faulted in already, ArenaFull beyond it (fresh
        shared pages cost 20 times what fresh private ones do: a big temporary array is
        better off in private memory)."""
        if self._raw_frees:
            self._give_back_raw()
        need = max(_round_up(size, ALIGNMENT), ALIGNMENT)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    break
            else:
                raise ArenaFull(f"no free range of {need} bytes in a store of {self.capacity} "
                                f"({self._used} in use)")
            if faulted_in and (offset + need > self._reserved or self.tight):
                raise ArenaFull(f"no {need} bytes faulted in")
            if length == need:
                del self._free[i]
            else:
                self._free[i] = (offset + need, length - need)
            self._used += need
            # beyond anything of the last TRIM_DELAY seconds: faulting in must keep ahead
            recent = max(self._peak, self._last_peak)
            self._growing = offset + need > recent
            if self._growing and self._grown_from is None:
                self._grown_from = recent
            self._high = max(self._high, offset + need)
            self._note_peak()
        try:
            if self.tight:  # back just this allocation: a full machine is an error, not SIGBUS
                os.posix_fallocate(self.fd, offset, need)
            else:
                self._ensure_reserved(offset + need)
        except OSError as e:
            self._release(offset, need)
            raise ArenaFull(f"the machine refused {need} more bytes of shared memory: {e}") from e
        if self._prefault_ahead and offset + need + PREFAULT_AHEAD > self._reserved:
            self._prefault_wanted.set()
        return offset, need

    def block_id(self, buffer):
        """The id of the allocation ``buffer`` starts at, or None if it is not one of ours."""
        offset = self.offset_of(buffer)
        return None if offset is None else self._id_at.get(offset)

    def offset_of(self, buffer):
        offset = buffer.address - self.address
        return offset if 0 <= offset < self.capacity else None

    def get(self, block_id):
        """What keeps the allocation with this id alive, or None once it has been freed."""
        ref = self._blocks.get(block_id)
        return None if ref is None else ref()

    def _release(self, offset, size, block_id=None):
        released_at, released_size = offset, size
        with self._lock:
            if block_id is not None:
                self._blocks.pop(block_id, None)
                if self._id_at.get(offset) == block_id:
                    del self._id_at[offset]
            self._used -= size
            i = bisect.bisect(self._free, (offset, size))
            if i < len(self._free) and offset + size == self._free[i][0]:
                size += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
                self._free[i - 1] = (offset, size)
            else:
                self._free.insert(i, (offset, size))
            if self.tight:  # give the freed pages back now (the lock keeps them unallocated)
                self._give_back(released_at, released_size)
            elif offset + size == self.capacity:  # the top is free: memory may go back
                self._high = offset
                self._growing = False  # (whatever grew the store lately was freed)
                self._grown_from = None
                if self._reserved > self._keep_reserved() + CHUNK and self.fd >= 0:
                    self._prefault_wanted.set()  # the prefault thread trims

    def _keep_reserved(self, *, growing=None):
        """How far memory stays reserved: the highest allocation of the last TRIM_DELAY
        seconds (a pipeline that frees its values and makes the next ones at once keeps its
        pages faulted in, rather than giving them back and faulting them in again) and some
        room ahead: a quarter of that when trimming (``growing`` None); when faulting in
        ahead, a chunk, or while ``growing`` as much as the store grew beyond what it had
        reached before (the last window's peak, or the recent one when this growth began),
        up to that quarter (a store filling up is kept ahead; a pipeline whose later runs
        reach a value or two higher gets a chunk, not another quarter)."""
        high = self._high
        self._note_peak()
        high = max(high, self._peak, self._last_peak)
        quarter = min(PREFAULT_AHEAD, max(CHUNK, high // 4))
        if growing is None:
            ahead = quarter
        elif growing:  # (within the first window there is no last one: a pipeline's third
            # run one value higher than its first got a quarter ahead, not a chunk)
            before = max(self._last_peak, self._grown_from or 0)
            ahead = min(quarter, max(CHUNK, high - before))
        else:
            ahead = CHUNK
        return min(self.capacity, _round_up(high + ahead, CHUNK))

    def _note_peak(self):
        """Keep the highest allocation end of the current and the last window (the caller
        holds the lock): whatever reached up there in the last TRIM_DELAY seconds did."""
        now = time.monotonic()
        if now - self._window_at >= TRIM_DELAY:
            self._last_peak = self._peak if now - self._window_at < 2 * TRIM_DELAY else 0
            self._peak, self._window_at = self._high, now
        elif self._high > self._peak:
            self._peak = self._high

    def _trim(self):
        """Give back the reserved memory far above every allocation (a value deleted, a
        message cut off): reserving it again costs a page fault per page, keeping it a
        machine's memory held for nothing."""
        with self._reserve_lock:
            with self._lock:
                keep = self._keep_reserved()
                end = self._reserved
                if end <= keep + CHUNK:
                    return
                self._reserved = keep  # allocations beyond it now wait for the lock above
            if _libc.madvise(self.address + keep, end - keep, MADV_REMOVE) != 0:
                logger.info("could not give back %d bytes of shared memory: errno %d",
                            end - keep, ctypes.get_errno())
                with self._lock:
                    self._reserved = max(self._reserved, end)

    def _give_back(self, offset, size):
        """Free the whole pages of ``[offset, offset + size)`` and their backing store."""
        start = _round_up(offset, mmap.PAGESIZE)
        end = (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and _libc.madvise(self.address + start, end - start, MADV_REMOVE) != 0:
            logger.info("could not give back %d bytes of shared memory: errno %d",
                        end - start, ctypes.get_errno())

    def _ensure_reserved(self, end):
        if end <= self._reserved or self.fd < 0:
            # private memory needs no reservation, and faults cheaply (huge pages) as the
            # kernel writes received bytes into it
            return
        with self._reserve_lock:
            while self._reserved < end:
                self._reserve_chunk()

    def _reserve_chunk(self):
        start = self._reserved
        length = min(CHUNK, self.capacity - start)
        if self.fd >= 0:
            os.posix_fallocate(self.fd, start, length)
        # Fault the pages in now, with the GIL released, rather than on first write.
        if _libc.madvise(self.address + start, length, MADV_POPULATE_WRITE) != 0:
            pass  # older kernels: pages fault in on first write instead
        self._reserved = start + length

    def _prefault_loop(self):
        while True:
            # woken by allocations and frees, and once the recent peak may be trimmed (or
            # a raw free waits to be given back)
            self._prefault_wanted.wait(TRIM_DELAY if self._reserved > CHUNK else None)
            self._prefault_wanted.clear()
            if self._closed:
                return
            self._give_back_raw()
            # ahead by a quarter of what is in use (a chunk at least): a store that stays
            # small costs little, one that grows is kept ahead, and its footprint beyond
            # what it holds stays bounded
            self._trim()
            try:
                self._reserve_ahead()
            except OSError as e:
                logger.warning("could not fault in shared memory ahead of use: %s", e)

    def _reserve_ahead(self):
        """Fault in a chunk at a time while the allocations want more room ahead: plenty
        while the store grows; where it only reuses what it reached lately (a pipeline's
        later runs), room it would not use costs them 3 s per GiB, so the target is
        looked at again after each chunk (trimming keeps more: see _trim)."""
        if self.fd < 0:
            return
        while not self._closed:
            with self._lock:
                keep = self._keep_reserved(growing=self._growing)
            with self._reserve_lock:
                if self._reserved >= keep:
                    return
                self._reserve_chunk()

    def close(self):
        """Stop prefaulting and drop this process's handle. Live views keep the memory."""
        self._closed = True
        self._prefault_wanted.set()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Raw:
    """A raw allocation: where it lies, and the block it became, if any."""

    __slots__ = ("offset", "need", "block_id", "metadata")

    def __init__(self, offset, need):
        self.offset, self.need = offset, need
        self.block_id = self.metadata = None


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple
