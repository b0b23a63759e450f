"""One call of a function, normalized once: its key, its arguments, the values it needs.

The arguments are walked once, when the call is made: their references are found (a
RemoteData is a KeyRef: the wire form the worker substitutes values into), their keys are
listed, and the RemoteData are kept alive with the call so that no input is freed while it
waits to run. Flat arguments (a map's) keep their RemoteData, which travel by key; inside
containers they become plain KeyRefs, since the arguments are then pickled.
"""

from dataclasses import dataclass, field
from typing import Any

from .references import RemoteData
from .task import CONTAINERS, KeyRef, find_leaves, map_leaves

REFERENCES = KeyRef  # how arguments name values held by the workers (RemoteData too)


@dataclass(slots=True)  # never changed once made; not frozen: that costs a call 0.6 us
class Call:
    """``function(*args, **kwargs)`` whose result is stored under ``key``.

    Attributes
    ----------
    key : str
    args : tuple
        References (:class:`KeyRef`) where the caller passed RemoteData: the RemoteData
        themselves in flat arguments, plain KeyRefs inside containers.
    kwargs : dict or None
    needs : tuple of str, or str
        The keys the call needs, each once, in order of first use; for f(x) over a
        RemoteData x's key alone, no tuple (a map over held values would make one per
        call, kept as long as the call: the collector counts them). :func:`as_keys`
        reads both.
    inputs : tuple of RemoteData
        Keeps the caller's inputs alive until the call has run.
    prefer : str or None
        A worker to run on when no worker holds any of its inputs (a dask graph's root
        node goes where its siblings went, so their dependent finds its inputs together).
    """

    key: str
    args: tuple
    kwargs: dict | None
    needs: tuple[str, ...] | str
    inputs: tuple = field(default=(), repr=False, compare=False)
    prefer: str | None = None

    @classmethod
    def of(cls, key: str, args: Any = (), kwargs: dict | None = None) -> "Call":
        args = tuple(args)
        if not kwargs and len(args) == 1:  # f(x): a map's call, the most common
            (arg,) = args
            if type(arg) is RemoteData:
                return cls(key, args, None, arg.key, args)
            if type(arg) not in CONTAINERS and not isinstance(arg, REFERENCES):
                return cls(key, args, None, ())
        if not kwargs:  # flat arguments take one look at each
            refs = []
            for arg in args:
                if type(arg) in CONTAINERS:
                    break
                if isinstance(arg, REFERENCES):
                    refs.append(arg)
            else:
                if not refs:
                    return cls(key, args, None, ())
                if len(refs) == 1 and type(refs[0]) is RemoteData:  # f(x) over RemoteData
                    (ref,) = refs
                    return cls(key, args, None, (ref.key,), args if len(args) == 1 else (ref,))
                return cls._naming(key, args, None, refs)
        refs = find_leaves((args, kwargs), REFERENCES)
        if refs:
            to_keyref = lambda ref: KeyRef(ref.key)  # noqa: E731
            args = map_leaves(args, RemoteData, to_keyref)
            kwargs = map_leaves(kwargs, RemoteData, to_keyref)
        return cls._naming(key, args, kwargs or None, refs)

    @classmethod
    def _naming(cls, key, args, kwargs, refs):
        """The call whose arguments hold ``refs`` (RemoteData and KeyRefs, in order)."""
        return cls(key, args, kwargs, tuple(dict.fromkeys(r.key for r in refs)),
                   tuple(r for r in refs if isinstance(r, RemoteData)))


def as_keys(needs: tuple[str, ...] | str) -> tuple[str, ...]:
    """A call's ``needs`` (or a recipe's entry of them) as a tuple of keys."""
    return (needs,) if type(needs) is str else needs
