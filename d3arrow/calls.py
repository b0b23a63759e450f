"""One call of a function, normalized once: its key, its arguments, the values it needs.

The arguments are walked once, when the call is made: RemoteData become KeyRefs (the wire
form the worker substitutes values into), their keys are listed, and the RemoteData are
kept alive with the call so that no input is freed while it waits to run.
"""

from dataclasses import dataclass, field
from typing import Any

from .references import RemoteData
from .task import KeyRef, find_leaves, map_leaves

REFERENCES = (RemoteData, KeyRef)  # how arguments name values held by the workers
_CONTAINERS = frozenset([list, tuple, set, frozenset, dict])  # where references may nest


@dataclass(slots=True)  # never changed once made; not frozen: that costs a call 0.6 us
class Call:
    """``function(*args, **kwargs)`` whose result is stored under ``key``.

    Attributes
    ----------
    key : str
    args : tuple
        With :class:`KeyRef` where the caller passed RemoteData.
    kwargs : dict or None
    needs : tuple of str
        The keys the call needs, each once, in order of first use.
    inputs : tuple of RemoteData
        Keeps the caller's inputs alive until the call has run.
    prefer : str or None
        A worker to run on when no worker holds any of its inputs (a dask graph's root
        node goes where its siblings went, so their dependent finds its inputs together).
    """

    key: str
    args: tuple
    kwargs: dict | None
    needs: tuple[str, ...]
    inputs: tuple = field(default=(), repr=False, compare=False)
    prefer: str | None = None

    @classmethod
    def of(cls, key: str, args: Any = (), kwargs: dict | None = None) -> "Call":
        args = tuple(args)
        if not kwargs:  # flat arguments (a map's) take one look at each
            refs = []
            for arg in args:
                if type(arg) in _CONTAINERS:
                    break
                if isinstance(arg, REFERENCES):
                    refs.append(arg)
            else:
                if not refs:
                    return cls(key, args, None, ())
                if len(refs) == 1 and type(refs[0]) is RemoteData:  # f(x) over RemoteData
                    (ref,) = refs
                    args = (KeyRef(ref.key),) if len(args) == 1 else tuple(
                        KeyRef(ref.key) if a is ref else a for a in args)
                    return cls(key, args, None, (ref.key,), (ref,))
                args = tuple(KeyRef(a.key) if isinstance(a, RemoteData) else a for a in args)
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
