"""Functions as a worker receives them: unpickled once per distinct pickle, with how long
their calls take.

A caller sends a function of its script by value with every request; the same bytes
unpickle to the same function, so they are unpickled once (keyed by a digest of the bytes:
a function whose globals changed pickles differently and is loaded again). What the calls
took decides where the next ones run: a function whose calls have all been quick runs on
the event loop, sparing the two thread hops (~150 us here) that would cost more than the
call itself. The first slow call sends it back to the compute threads for good.
"""

import collections
import hashlib
import os

from .serialize import Serialized, payload_nbytes
from .store import load

CACHED = 256  # distinct functions kept per worker
CACHE_BYTES = 2**20  # a bigger pickle (a closure holding data) is loaded every time
# a call this short costs less than the hop to a compute thread ($D3ARROW_QUICK_CALL_SECONDS;
# 0 runs every call in a thread)
QUICK_SECONDS = float(os.environ.get("D3ARROW_QUICK_CALL_SECONDS", "0.0005"))
QUICK_BATCH_SECONDS = 0.002  # at most this long on the loop per request
QUICK_AFTER = 2  # calls seen (in a compute thread) before the loop is trusted with more


class Function:
    """A loaded function and what its calls took on this worker."""

    __slots__ = ("func", "calls", "longest", "off_loop")

    def __init__(self, func):
        self.func = func
        self.calls = 0
        self.longest = 0.0  # seconds of its slowest call so far
        self.off_loop = False  # once true, never on the event loop again

    def quick(self, ncalls):
        """Whether ``ncalls`` calls may run on the event loop: every call so far was
        quick, and all of them together are too."""
        return (not self.off_loop and self.calls >= QUICK_AFTER
                and self.longest * ncalls <= max(QUICK_BATCH_SECONDS, QUICK_SECONDS))

    def record(self, seconds):
        """One call took ``seconds``; False if that was too long to stay on the loop."""
        self.calls += 1
        if seconds > self.longest:
            self.longest = seconds
        if seconds > QUICK_SECONDS:
            self.off_loop = True
        return not self.off_loop


class Functions:
    """The functions a worker has loaded, by the digest of their pickled bytes."""

    def __init__(self, size=CACHED):
        self._size = size
        self._loaded = collections.OrderedDict()  # digest -> Function, least recent first

    def load(self, serialized: Serialized) -> Function:
        digest = _digest(serialized)
        if digest is None:
            return Function(load(serialized))
        found = self._loaded.get(digest)
        if found is None:
            found = self._loaded[digest] = Function(load(serialized))
            if len(self._loaded) > self._size:
                self._loaded.popitem(last=False)
        else:
            self._loaded.move_to_end(digest)
        return found


def _digest(serialized):
    """What identifies a function's pickle (None: too big to keep)."""
    if sum(payload_nbytes(p) for p in serialized.payloads) > CACHE_BYTES:
        return None
    h = hashlib.blake2b(repr(sorted(serialized.meta.items())).encode(), digest_size=16)
    for payload in serialized.payloads:
        for piece in payload if isinstance(payload, list) else [payload]:
            h.update(piece)
    return h.digest()
