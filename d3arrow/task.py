"""Key references inside a task's arguments.

The client replaces each ``RemoteData`` in ``args``/``kwargs`` by a :class:`KeyRef` before
pickling them; the worker replaces each ``KeyRef`` by the value it holds. References are
found inside lists, tuples, sets and dict values, as deep as they nest.
"""


class KeyRef:
    """Names a key whose value the worker substitutes before calling the function."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return KeyRef, (self.key,)

    def __eq__(self, other):
        return isinstance(other, KeyRef) and other.key == self.key

    def __hash__(self):
        return hash(("KeyRef", self.key))

    def __repr__(self):
        return f"KeyRef({self.key!r})"


_SEQUENCES = (list, tuple, set, frozenset)
CONTAINERS = frozenset([*_SEQUENCES, dict])  # where references may nest


def map_leaves(obj, leaf_type, func):
    """Rebuild ``obj`` with every ``leaf_type`` instance inside containers replaced by ``func(it)``."""
    if isinstance(obj, leaf_type):
        return func(obj)
    kind = type(obj)
    if kind in _SEQUENCES:  # (one look at each item: no call for a leaf or a scalar)
        return kind([func(item) if isinstance(item, leaf_type) else
                     map_leaves(item, leaf_type, func) if type(item) in CONTAINERS else item
                     for item in obj])
    if kind is dict:
        return {k: func(v) if isinstance(v, leaf_type) else
                map_leaves(v, leaf_type, func) if type(v) in CONTAINERS else v
                for k, v in obj.items()}
    return obj


def find_leaves(obj, leaf_type):
    """Every ``leaf_type`` instance inside ``obj``'s containers, in order."""
    found = []
    map_leaves(obj, leaf_type, found.append)
    return found
