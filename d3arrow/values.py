"""The values a worker holds, each with its size and where it lies: private memory, the
shared store, or a spilled file.

One object keeps these in step. The event loop adds, spills and removes values; compute
threads read them while it does (single dict operations, atomic under the GIL). Reads
keep a least-recently-used order, which decides what is spilled first.
"""

import collections
from collections.abc import Iterable, Iterator
from typing import Any

from .serialize import nbytes as size_of
from .spill import SpilledValue


class Values:
    """``key -> value`` with ``nbytes`` and, for values in a shared store or spilled to
    disk, the reference a co-located reader opens them by."""

    def __init__(self, *, reads_count: bool = True) -> None:
        self._data: dict[str, Any] = {}
        self._nbytes: dict[str, int] = {}
        self._shared: dict[str, dict] = {}
        self._spilled: dict[str, int] = {}  # key -> nbytes of the values held in files
        self._recent: collections.OrderedDict = collections.OrderedDict()  # LRU first
        # whether reading a value makes it recent: only spilling by a memory limit asks
        # (moving a node of a big linked list costs a read cache misses for nothing)
        self._reads_count = reads_count

    def put(self, key: str, value: Any, ref_meta: dict | None = None) -> None:
        """Hold ``value`` under ``key``; ``ref_meta`` says where it lies in shared memory.
        A SpilledValue (a co-located peer's file, adopted) is held as spilled."""
        _close_file(self._data.get(key))
        if type(value) is SpilledValue:
            self._nbytes[key] = value.nbytes
            self._hold_spilled(key, value)
            return
        self._nbytes[key] = size_of(value)
        self._spilled.pop(key, None)
        if ref_meta is None:
            self._shared.pop(key, None)
        else:
            self._shared[key] = ref_meta
        self._data[key] = value
        recent = self._recent
        if key in recent:
            recent.move_to_end(key)
        else:
            recent[key] = None

    def spill(self, key: str, value: Any, spilled: SpilledValue) -> bool:
        """Hold ``key`` in its spilled file from now on, if it still is ``value`` (not
        deleted or replaced while it was written); whether it was."""
        if self._data.get(key) is not value or type(value) is SpilledValue:
            return False
        self._hold_spilled(key, spilled)
        return True

    def _hold_spilled(self, key: str, spilled: SpilledValue) -> None:
        self._data[key] = spilled
        self._spilled[key] = self._nbytes.get(key, spilled.nbytes)
        self._shared.pop(key, None)  # its file is how a reader on this host sees it now
        self._recent.pop(key, None)  # out of memory: not a candidate for spilling

    def discard(self, key: str) -> bool:
        """Forget ``key``; whether it was held."""
        return bool(self.discard_all((key,)))

    def discard_all(self, keys: Iterable[str]) -> list[str]:
        """Forget these keys (a client freeing a map's results); those that were held."""
        data, nbytes, shared, recent, spilled = (self._data, self._nbytes, self._shared,
                                                 self._recent, self._spilled)
        held = []
        for key in keys:
            value = data.pop(key, _MISSING)
            if value is _MISSING:
                continue
            _close_file(value)
            spilled.pop(key, None)
            del nbytes[key]
            shared.pop(key, None)
            recent.pop(key, None)
            held.append(key)
        return held

    def __getitem__(self, key: str) -> Any:
        """The value; for a spilled one, a view of its file (no copy into memory)."""
        held = self._data[key]
        if type(held) is SpilledValue:
            return held.load()
        if self._reads_count:
            try:
                self._recent.move_to_end(key)
            except KeyError:  # discarded meanwhile by the loop
                pass
        return held

    def all_at_once(self, keys: list[str]) -> list | None:
        """``[self[key] for key in keys]`` in one go (a batch of calls over held values
        reads its inputs), or None where a read is more than a look-up: reads count (a
        memory limit), or one is spilled or gone. Then each is read as its call runs."""
        if self._reads_count:
            return None
        data = self._data
        try:
            held = [data[key] for key in keys]
        except KeyError:  # deleted meanwhile: its call fails alone
            return None
        return None if SpilledValue in map(type, held) else held

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def lacking(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` not held here."""
        data = self._data
        return [k for k in keys if k not in data]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def nbytes(self, key: str) -> int:
        return self._nbytes[key]

    def nbytes_of(self, keys: Iterable[str]) -> dict[str, int]:
        return {key: self._nbytes[key] for key in keys}

    def ref_meta(self, key: str) -> dict | None:
        """How a reader on this host views the value in place (in shared memory, ours or a
        co-located peer's, or in its spilled file), or None."""
        held = self._data.get(key)
        if type(held) is SpilledValue:
            return held.ref_meta()
        return self._shared.get(key)

    def is_spilled(self, key: str) -> bool:
        return type(self._data.get(key)) is SpilledValue

    def in_memory(self) -> list[str]:
        """The keys held in memory, least recently used first."""
        return list(self._recent)

    def raw(self, key: str) -> Any:
        """What is held for ``key``: the value, or its SpilledValue (no file is read)."""
        return self._data[key]

    def get_raw(self, key: str) -> Any:
        """:meth:`raw`, or None if ``key`` is not held."""
        return self._data.get(key)

    def close(self) -> None:
        """Close every spilled file (the worker stops)."""
        for key in list(self._data):
            _close_file(self._data.pop(key, None))
        self._spilled.clear()

    @property
    def spilled_count(self) -> int:
        return len(self._spilled)

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the values held in spilled files: summed over those alone, when asked
        (values are spilled from compute threads as well as the loop: each keeps its own
        entry, no shared running total to race on)."""
        return sum(self._spilled.values())


_MISSING = object()


def _close_file(held: Any) -> None:
    """Close ``held`` if it is a spilled value's file (what a key held before it goes)."""
    if type(held) is SpilledValue:
        held.close()
