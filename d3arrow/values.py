"""The values a worker holds, each with its size and, in shared memory, its reference.

One object keeps the three in step. The event loop adds and removes values; compute threads
read them while it does (single dict operations, atomic under the GIL).
"""

from collections.abc import Iterable, Iterator
from typing import Any

from .serialize import nbytes as size_of


class Values:
    """``key -> value`` with ``nbytes`` and, for values in a shared store, their ref meta."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._nbytes: dict[str, int] = {}
        self._shared: dict[str, dict] = {}

    def put(self, key: str, value: Any, ref_meta: dict | None = None) -> None:
        """Hold ``value`` under ``key``; ``ref_meta`` says where it lies in shared memory."""
        self._nbytes[key] = size_of(value)
        if ref_meta is None:
            self._shared.pop(key, None)
        else:
            self._shared[key] = ref_meta
        self._data[key] = value

    def discard(self, key: str) -> bool:
        """Forget ``key``; whether it was held."""
        if self._data.pop(key, _MISSING) is _MISSING:
            return False
        del self._nbytes[key]
        self._shared.pop(key, None)
        return True

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def nbytes(self, key: str) -> int:
        return self._nbytes[key]

    def nbytes_of(self, keys: Iterable[str]) -> dict[str, int]:
        return {key: self._nbytes[key] for key in keys}

    def ref_meta(self, key: str) -> dict | None:
        """Where the value lies in shared memory (ours or a co-located peer's), or None."""
        return self._shared.get(key)


_MISSING = object()
