"""A worker's memory limit: spill least recently used values above a target, pause above
a higher mark, and say so.

What counts is what the worker owns, measured: its private memory as the kernel counts it
(``RssAnon`` of ``/proc/self/status``: the interpreter and every value in private memory)
plus the bytes of the values in its shared store. Pages of spilled files mapped while a
task reads them, views of co-located peers' memory and the store's free pages faulted in
ahead are the kernel's to reclaim or another worker's, and are not counted.
"""

import asyncio
import ctypes
import ctypes.util
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from .errors import SpillError
from .spill import SpillDirectory, SpilledValue

logger = logging.getLogger(__name__)

TARGET = 0.6  # spill above this fraction of the limit, down to it
PAUSE = 0.8  # above this fraction, start no task and take no scattered value
CHECK_SECONDS = 0.05  # how often memory is measured while a limit is set
MIN_SPILL_BYTES = 1024  # smaller values are not worth a file
STALLED_SECONDS = 10.0  # a compute thread waits for room no longer without a memory check


def parse_memory_limit(spec: Any, workers_on_host: int = 1) -> int | None:
    """Bytes from ``'4GiB'``, ``'512MB'``, ``'50%'``, ``'auto'``, a number; None for no
    limit (``0``, ``None``, ``'none'``). ``auto`` and percentages are of this machine's
    memory (or its cgroup's limit), split among ``workers_on_host``.

    Raises
    ------
    ValueError
        Not a memory size.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("0", "none", "")):
        return None
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if spec < 0:
            raise ValueError(f"memory limit {spec!r} is negative")
        return int(spec) or None
    if not isinstance(spec, str):
        raise ValueError(f"memory limit {spec!r}: give bytes, '4GiB', '50%' or 'auto'")
    text = spec.strip().lower()
    share = system_memory() // max(1, workers_on_host)
    if text == "auto":
        return share
    if text.endswith("%"):
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"memory limit {spec!r} is not a percentage") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"memory limit {spec!r}: a percentage must be in (0, 100]")
        return int(share * fraction)
    match = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(i?b?)", text)
    if not match:
        raise ValueError(f"memory limit {spec!r} is not a size (try 4GiB, 512MB, 50%, auto)")
    number, unit, _ = match.groups()
    try:
        size = float(number)
    except ValueError:
        raise ValueError(f"memory limit {spec!r} is not a size") from None
    return int(size * 1024 ** "_kmgt".index(unit or "_")) or None


def system_memory() -> int:
    """This machine's memory, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def private_memory() -> int:
    """Bytes of this process's private (anonymous) resident memory."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _give_back_memory() -> None:
    """Ask the allocators to return freed memory to the kernel (they keep it otherwise):
    glibc's heap, and Arrow's pool, where received messages live."""
    pa.default_memory_pool().release_unused()
    try:
        _libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


class MemoryManager:
    """Keeps a worker's memory under its limit.

    Parameters
    ----------
    values : Values
        The worker's values; the least recently used are spilled first.
    limit : int or None
        Bytes; None measures and reports but never spills or pauses.
    store_used : callable
        Bytes of values in the worker's shared store now.
    spillable : callable(key) -> bool
        Whether a value is the worker's own to spill (not a view of a peer's memory, not
        on its way into the store).
    directory : str, optional
        Where to spill (default: the system's temporary directory).
    target, pause : float
        Fractions of the limit: spill down to ``target`` once above it; above ``pause``,
        the worker is paused until spilling brings it back under.
    """

    def __init__(self, values: Any, limit: int | None, *, store_used: Callable[[], int],
                 spillable: Callable[[str], bool], directory: str | None = None,
                 target: float = TARGET, pause: float = PAUSE) -> None:
        if not 0 < target <= pause <= 1:
            raise ValueError(f"need 0 < target ({target}) <= pause ({pause}) <= 1")
        self.values = values
        self.limit = limit
        self.target, self.pause = target, pause
        self.directory = SpillDirectory(directory)
        self._store_used = store_used
        self._spillable = spillable
        self.paused = False
        self.error: SpillError | None = None  # the last spill that failed, while over
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._wanted = asyncio.Event()
        self._spilling = asyncio.Lock()
        self._checks = 0  # how many times keep_under_limit ran: threads wait for a verdict
        # the loop's spiller, a reader's share and a full store's overflow may pick the same
        # value from different threads: one at a time, each sees what the last one did
        self._one_spill = threading.Lock()

    def measure(self) -> int:
        return private_memory() + self._store_used()

    def info(self) -> dict:
        return {"limit": self.limit, "memory": self.measure(), "target": self.target,
                "pause": self.pause, "spilled_bytes": self.values.spilled_bytes,
                "spilled_count": self.values.spilled_count, "paused": self.paused,
                "directory": self.directory.path,
                "error": None if self.error is None else str(self.error)}

    def check_soon(self) -> None:
        """Something grew: measure now rather than at the next tick."""
        self._wanted.set()

    async def run(self) -> None:
        """Measure every CHECK_SECONDS (or when told), spill and pause as needed."""
        if self.limit is None:
            return
        while True:
            try:
                await asyncio.wait_for(self._wanted.wait(), CHECK_SECONDS)
            except TimeoutError:
                pass
            self._wanted.clear()
            await self.keep_under_limit()

    async def keep_under_limit(self) -> None:
        async with self._spilling:
            used = self.measure()
            if used > self.limit * self.pause:
                self._set_paused(True, used)
            if used > self.limit * self.target:
                used = await self._spill(used - int(self.limit * self.target))
            if used <= self.limit * self.pause:
                self._set_paused(False, used)
            elif self.error is None and not self._has_spillable():
                # what is left is not values (the interpreter, a user's globals): staying
                # paused would wait forever
                if self.paused:
                    logger.warning("%d bytes in memory with nothing left to spill: resuming "
                                   "over the pause mark", used)
                self._set_paused(False, used)
            self._checks += 1

    async def _spill(self, excess: int) -> int:
        """Spill least recently used values of ours until ``excess`` bytes went to disk;
        the memory measured after."""
        start, freed, count = time.perf_counter(), 0, 0
        for key in self.values.in_memory():
            if freed >= excess:
                break
            if (key not in self.values or not self._spillable(key)
                    or self.values.nbytes(key) < MIN_SPILL_BYTES):
                continue
            try:
                nbytes = await self.spill_now(key)
            except SpillError:
                break
            if nbytes:
                freed += nbytes
                count += 1
        if count:
            await asyncio.get_running_loop().run_in_executor(None, _give_back_memory)
            logger.info("spilled %d values (%d bytes) to %s in %.3f s; %d bytes in spilled "
                        "files now", count, freed, self.directory.path,
                        time.perf_counter() - start, self.values.spilled_bytes)
        return self.measure()

    def _has_spillable(self) -> bool:
        return any(self._spillable(k) and self.values.nbytes(k) >= MIN_SPILL_BYTES
                   for k in self.values.in_memory() if k in self.values)

    async def spill_now(self, key: str) -> int:
        """:meth:`spill` in a thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.spill, key)

    def spill(self, key: str) -> int:
        """Write ``key``'s value to disk and hold it there; the bytes it took in memory
        (0 if it went meanwhile or cannot be serialized). Raises SpillError (also kept
        in :attr:`error`) when the disk refuses it: the value stays in memory. Blocks on
        the disk: call it from a thread."""
        with self._one_spill:
            value = self.values.get_raw(key)
            if value is None or type(value) is SpilledValue:  # gone, or spilled already
                return 0
            try:
                spilled = self.directory.write(value)
            except SpillError as e:
                if self.error is None:
                    logger.error("cannot spill: %s; keeping every value in memory", e)
                self.error = e
                raise
            except TypeError as e:  # cannot be serialized: it stays in memory
                logger.info("cannot spill %s: %s", key, e)
                return 0
            self.error = None
            if not self.values.spill(key, value, spilled):
                spilled.close()
                return 0
            return self.values.nbytes(key)

    def _set_paused(self, paused: bool, used: int) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        if paused:
            self._unpaused.clear()
            logger.info("paused: %d bytes in memory, over %.0f%% of the %d byte limit", used,
                        self.pause * 100, self.limit)
        else:
            self._unpaused.set()
            logger.info("resumed: %d bytes in memory", used)

    def room_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """In a compute thread, after storing a result: if the worker is over its pause
        mark, wait until spilling (on ``loop``) brought it under.

        Raises
        ------
        SpillError
            The disk refuses the spill: waiting would be forever.
        """
        if self.limit is None:
            return
        used = self.measure()
        if used <= self.limit * self.target:
            return
        loop.call_soon_threadsafe(self.check_soon)
        checks, since = self._checks, time.monotonic()
        while used > self.limit * self.pause:
            if self._checks > checks + 1 and not self.paused:  # resumed over the mark
                return
            if self._checks == checks and time.monotonic() - since > STALLED_SECONDS:
                logger.warning("no memory check for %.0f s (is the worker's loop stuck?): "
                               "going on over the pause mark", STALLED_SECONDS)
                return
            if self.error is not None:
                raise SpillError(f"over {self.pause:.0%} of the memory limit ({self.limit} "
                                 f"bytes) and cannot spill: {self.error}")
            time.sleep(CHECK_SECONDS / 5)
            used = self.measure()
            loop.call_soon_threadsafe(self.check_soon)

    async def room(self) -> None:
        """Wait until the worker is not paused.

        Raises
        ------
        SpillError
            It is paused and spilling failed (a full disk): waiting would be forever.
        """
        while self.paused:
            if self.error is not None:
                raise SpillError(f"worker is over {self.pause:.0%} of its memory limit "
                                 f"({self.limit} bytes) and cannot spill: {self.error}")
            self.check_soon()
            try:
                await asyncio.wait_for(self._unpaused.wait(), CHECK_SECONDS * 4)
            except TimeoutError:
                pass
