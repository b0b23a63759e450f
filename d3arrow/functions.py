"""Functions on the wire: pickled once while they stay the same, unpickled once per
distinct pickle by the worker, which learns how long their calls take.

A function sent by name is pickled once. One of the user's script (``__main__``), a lambda
or a closure travels by value, with the globals it uses as they are at the call: it is
pickled again only when something its pickle depends on changed (its code, defaults,
closure, or the globals it names); where that cannot be told cheaply (it names a list, a
dict, an array: changeable in place) it is pickled at every call.

A caller sends a function of its script by value with every request; the same bytes
unpickle to the same function, so they are unpickled once (keyed by the bytes, or a digest
of big ones: a function whose globals changed pickles differently and is loaded again). What the calls
took decides where the next ones run: a function whose calls have been quick runs on the
event loop, sparing the two thread hops (~150 us here) that would cost more than the call
itself. A slow call sends it back to the compute threads, until its calls there have been
quick often enough in a row (twice as often each time it relapses); a call ten times over
the limit sends it there for good.
"""

import collections
import functools
import hashlib
import os
import sys
import types
import weakref

import cloudpickle

from .serialize import Serialized, payload_nbytes, serialize
from .store import load

CACHED = 256  # distinct functions kept per worker
CACHE_BYTES = 2**20  # a bigger pickle (a closure holding data) is loaded every time
KEY_BYTES = 2**14  # a pickle this small is its own cache key
# a call this short costs less than the hop to a compute thread ($D3ARROW_QUICK_CALL_SECONDS;
# 0 runs every call in a thread)
QUICK_SECONDS = float(os.environ.get("D3ARROW_QUICK_CALL_SECONDS", "0.0005"))
QUICK_BATCH_SECONDS = 0.002  # at most this long on the loop per request
QUICK_AFTER = 2  # quick calls seen (in a compute thread) before the loop is trusted with more
RETRUST_AFTER = 32  # after a slow call: quick calls in a row before the loop is trusted again
SLOW_FOR_GOOD = 10  # a call this many times QUICK_SECONDS is no hiccup: threads for good


class Function:
    """A loaded function and what its calls took on this worker."""

    __slots__ = ("func", "streak", "longest", "off_loop", "trusted_after", "needs_thread")

    def __init__(self, func):
        self.func = func
        self.streak = 0  # quick calls in a row
        self.longest = 0.0  # seconds of the slowest of them
        self.off_loop = False  # a call was slow: in threads until enough quick ones again
        self.trusted_after = QUICK_AFTER  # quick calls in a row it takes to be on the loop
        self.needs_thread = False  # a call needed the loop free: never on the loop again

    def quick(self, ncalls):
        """Whether ``ncalls`` calls may run on the event loop: the calls since the last
        slow one were quick, enough of them, and all of them together are quick too."""
        return (not self.off_loop and not self.needs_thread
                and self.streak >= self.trusted_after
                and self.longest * ncalls <= max(QUICK_BATCH_SECONDS, QUICK_SECONDS))

    def record(self, seconds, *, on_loop=False):
        """One call took ``seconds`` (``on_loop``: on the event loop); False if that was too
        long to stay on the loop.

        A slow call sends the function to the threads until it has made twice as many
        quick calls in a row as last time: a hiccup (the machine busy, a collection) costs
        a few calls in threads, while a function that is sometimes slow comes back ever
        more rarely. A call that held up the loop for over SLOW_FOR_GOOD times the quick
        limit is no hiccup: the function stays in the threads for good, so at most one
        long call of a function ever holds up the loop. One that long in a compute thread
        held nothing up (a first call doing one-time work, a machine that was busy): it
        counts as any slow call, or one such call would cost every later call of a quick
        function two thread hops (an apply 55 us a call -> 230)."""
        if seconds > QUICK_SECONDS:
            if on_loop and seconds > QUICK_SECONDS * SLOW_FOR_GOOD:  # no hiccup
                self.needs_thread = True
            if self.streak >= self.trusted_after:  # it had been trusted: trust it less
                self.trusted_after = max(self.trusted_after * 2, RETRUST_AFTER)
            self.streak, self.longest, self.off_loop = 0, 0.0, True
            return False
        self.streak += 1
        if seconds > self.longest:
            self.longest = seconds
        if self.off_loop and self.streak >= self.trusted_after:
            self.off_loop = False
        return True


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
    """What identifies a function's pickle (None: too big to keep): a small plain pickle
    by its bytes (hashing them is ten times cheaper than a digest, and this runs at every
    request), others by a digest of their meta and bytes."""
    payloads = serialized.payloads
    if (serialized.meta == _PLAIN_PICKLE and len(payloads) == 1
            and not isinstance(payloads[0], list) and len(payloads[0]) <= KEY_BYTES):
        return payloads[0].to_pybytes()
    if sum(payload_nbytes(p) for p in payloads) > CACHE_BYTES:
        return None
    h = hashlib.blake2b(repr(sorted(serialized.meta.items())).encode(), digest_size=16)
    for payload in serialized.payloads:
        for piece in payload if isinstance(payload, list) else [payload]:
            h.update(piece)
    return ("digest", h.digest())


_PLAIN_PICKLE = {"kind": "pickle"}


# -- the caller's side -----------------------------------------------------------------------

def wire_form(func) -> Serialized:
    """``func`` serialized, from the cache while nothing it is pickled with has changed."""
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    # by name: nothing in it can change; its entry must not hold it (a weak key)
    by_reference = _sent_by_reference(func)
    if by_reference:
        _check_imported(func)
    fingerprint = None if by_reference else _fingerprint(func)
    if fingerprint is not _CHANGEABLE:
        try:
            cached = _sent.get(func)
        except TypeError:  # neither hashable nor weakly referable
            cached = None
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
    try:
        serialized = serialize(func)
    except TypeError as e:
        raise TypeError(f"cannot send function {getattr(func, '__qualname__', func)!r} to "
                        f"the workers: {e}") from e
    if fingerprint is not _CHANGEABLE:
        try:
            _sent[func] = (fingerprint, serialized)
        except TypeError:
            pass
    return serialized


_sent = weakref.WeakKeyDictionary()  # function -> (fingerprint, serialized)
_CHANGEABLE = object()
_SCALARS = frozenset([int, float, complex, str, bytes, bool, type(None), type(Ellipsis)])
_AS_THEY_ARE = _SCALARS | {types.ModuleType, types.BuiltinFunctionType}  # in a fingerprint


def _sent_by_reference(func):
    """Whether pickling ``func`` names it (module + qualified name) rather than copying it."""
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not module or not name or module == "__main__" or "<" in name:
        return False
    if any(module == m or module.startswith(m + ".")
           for m in cloudpickle.list_registry_pickle_by_value()):
        return False
    found = sys.modules.get(module)
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is func


def _check_imported(func):
    """A function sent by name from a module still being imported (a Pool used at its top
    level) would make pickle wait for that import, which waits for us: an error instead."""
    module = sys.modules.get(func.__module__)
    spec = getattr(module, "__spec__", None)
    if getattr(spec, "_initializing", False):
        raise RuntimeError(
            f"cannot send {func.__qualname__} to the workers while its module "
            f"{func.__module__!r} is still being imported: each worker would import it and "
            f"run its top level again. Call the Pool from a function, or under "
            f"`if __name__ == '__main__':`")


def _fingerprint(func, seen=()):
    """What the by-value pickle of a plain function depends on, as a tuple of objects that
    compare by value (scalars, code) or identity (modules, functions sent by name); or
    _CHANGEABLE where it depends on something that can change in place. (Computed at
    every call of a script's function: written for speed.)"""
    if type(func) is not types.FunctionType or func.__dict__:
        return _CHANGEABLE
    code, globals_ = func.__code__, func.__globals__
    named = tuple([name for name in _names(code) if name in globals_])
    values = [globals_[name] for name in named]
    if func.__defaults__:
        values.extend(func.__defaults__)
    if func.__kwdefaults__:
        values.extend(func.__kwdefaults__.values())
    if func.__closure__:
        values.extend([_contents(cell) for cell in func.__closure__])
    for i, value in enumerate(values):
        if type(value) not in _AS_THEY_ARE:
            value = values[i] = _part(value, (*seen, id(func)))
            if value is _CHANGEABLE:
                return _CHANGEABLE
    # the names beside the values: a global the code names that appears or goes counts
    return (code, func.__qualname__, func.__module__, tuple(func.__annotations__.items()),
            named, tuple(func.__kwdefaults__ or ()), tuple(values))


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _part(value, seen):
    """``value`` as part of a fingerprint, or _CHANGEABLE."""
    kind = type(value)
    if kind in _AS_THEY_ARE:
        return value
    if kind is tuple:
        parts = tuple(_part(v, seen) for v in value)
        return _CHANGEABLE if any(p is _CHANGEABLE for p in parts) else ("tuple", parts)
    if kind is types.FunctionType:
        if _sent_by_reference(value):
            return value
        if id(value) in seen:  # recursion: its code is in the fingerprint already
            return ("self", value.__qualname__)
        return _fingerprint(value, seen)
    if isinstance(value, type) and _sent_by_reference(value):
        return value
    return _CHANGEABLE


@functools.lru_cache(maxsize=1024)
def _names(code):
    """Every name a code object (and the code nested in it) looks up, in order."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_names(const))
    return tuple(sorted(names))
