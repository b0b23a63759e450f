"""Keys, and who owns the value a key names, read from the key itself.

Every client has an owner id (16 hex digits). The keys it makes start with it: ``OWNER-N``
for results and unnamed scattered values, ``OWNER/NAME`` for values a user named. So two
clients never share a key by accident, and any process (the center, a worker) can tell
whose a value is without being told: when its owner is gone, the value can be freed.
Keys of another form (written by hand to a worker) have no owner and are never freed
automatically.
"""

import itertools
import string
import uuid

OWNER_CHARS = 16
_HEX = frozenset(string.hexdigits)


def new_owner():
    return uuid.uuid4().hex[:OWNER_CHARS]


class KeyMaker:
    """Makes the keys of one owner: a counter for results, the user's names scoped."""

    def __init__(self, owner):
        self.owner = owner
        self._counter = itertools.count()

    def new(self):
        return f"{self.owner}-{next(self._counter)}"

    def named(self, name):
        if not isinstance(name, str):
            raise TypeError(f"a value's name is a str, not {type(name).__name__} {name!r}")
        return f"{self.owner}/{name}"


def owner_of(key):
    """The owner id a key starts with, or None for a key of no owner."""
    head = key[:OWNER_CHARS + 1]  # the owner and the separator: few of them, each read once
    owner = _owners.get(head, _UNREAD)
    if owner is _UNREAD:
        if len(_owners) >= _OWNERS_KEPT:
            _owners.clear()
        owner = _owners[head] = (head[:OWNER_CHARS] if len(key) > OWNER_CHARS and
                                 head[-1] in "-/" and _HEX.issuperset(head[:OWNER_CHARS])
                                 else None)
    return owner


def keys_by_owner(keys):
    """``{owner or None: [key]}`` of ``keys``. Keys come in runs of one owner's (a batch of
    results): after the first of a run, each costs a prefix test, not a look-up."""
    groups = {}
    head = group = None
    for key in keys:
        if head is None or not key.startswith(head):
            owner = owner_of(key)
            head = None if owner is None else key[:OWNER_CHARS + 1]
            group = groups.setdefault(owner, [])
        group.append(key)
    return groups


_owners = {}  # key's head -> its owner or None: the center reads one per key it is told of
_OWNERS_KEPT = 4096
_UNREAD = object()
