"""What a client knows of where values live: holders, sizes, and peers that failed it.

Knowledge, not truth: it may be stale (a holder died, a replica was made), so readers fall
back on the center's ``who_has``. A peer that failed us (``CommClosedError``) is left out of
every answer for a while, until the center has dropped it if it is dead.
"""

import collections
from collections.abc import Iterable, Mapping, Sequence

from .core import RecentFailures


class Placement:
    """``key -> holders`` and ``key -> nbytes`` for the values a client placed or learned of.

    Holders are kept as tuples: immutable, so the garbage collector stops tracking them
    (a client holding a million results would have it walk a million sets).
    """

    def __init__(self) -> None:
        self._where: dict[str, tuple[str, ...]] = {}
        self._only: dict[str, tuple[str]] = {}  # address -> (address,): one tuple, shared
        self._nbytes: dict[str, int] = {}
        self.unreachable = RecentFailures()

    def placed(self, key: str, address: str, nbytes: int | None = None) -> None:
        """``key`` now lives on ``address`` only (we put it there)."""
        only = self._only.get(address)
        if only is None:
            only = self._only[address] = (address,)
        self._where[key] = only
        if nbytes is not None:
            self._nbytes[key] = nbytes

    def learn(self, who_has: Mapping[str, Iterable[str]]) -> None:
        """Take the center's answer for these keys (keys it knows no holder of are kept)."""
        for key, addresses in who_has.items():
            if addresses:
                self._where[key] = tuple(dict.fromkeys(addresses))

    def forget(self, key: str) -> tuple[str, ...]:
        """Forget where ``key`` lives (stale); the holders we believed in."""
        return self._where.pop(key, ())

    def drop_all(self, keys: Sequence[str]) -> list[tuple[str, ...]]:
        """Forget these keys altogether (deleted); the holders we believed in, per key in
        order."""
        nbytes, where = self._nbytes, self._where
        for key in keys:
            nbytes.pop(key, None)
        return [where.pop(key, ()) for key in keys]

    def unplaced(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if not self._where.get(k)}

    def holders(self, key: str) -> tuple[str, ...] | list[str]:
        """Reachable holders of ``key``, as far as we know."""
        where = self._where.get(key, ())
        return self.reachable(where) if self.unreachable else where

    def known_holders(self) -> Mapping[str, tuple[str, ...]] | None:
        """``{key: holders}`` to read while no peer failed us lately (each of them is then
        reachable as far as we know), else None: ask :meth:`holders` per key."""
        return None if self.unreachable else self._where

    def hints(self, address: str, keys: Iterable[str]) -> dict:
        """``{key: holders}`` of the keys that ``address`` does not hold and others do, as
        far as we know: where a worker asked to run calls needing them finds them."""
        where = self._where
        elsewhere = {key for key in keys
                     if address not in where.get(key, ())}  # (usually none: placed there)
        hints = {key: self.holders(key) for key in elsewhere}
        return {k: v for k, v in hints.items() if v}

    def holds(self, address: str, key: str) -> bool:
        """Whether we believe ``address`` holds ``key``."""
        return address in self._where.get(key, ())

    def nbytes(self, key: str) -> int | None:
        return self._nbytes.get(key)

    def held_bytes(self, keys: Iterable[str]) -> collections.Counter:
        """``{address: bytes of these keys it holds}``: where a task needing them should run."""
        held = collections.Counter()
        for key in keys:
            for address in self.holders(key):
                held[address] += self._nbytes.get(key) or 1
        return held

    def failed(self, address: str) -> None:
        """``address`` could not be reached: leave it out until the center drops it."""
        self.unreachable.add(address)
        for key, holders in list(self._where.items()):  # (a caller's thread may add keys)
            if address in holders:
                self._where[key] = tuple(a for a in holders if a != address)

    def reachable(self, addresses: Iterable[str]) -> list[str]:
        """``addresses`` less those that failed us lately (they may have died)."""
        return self.unreachable.without(addresses)
