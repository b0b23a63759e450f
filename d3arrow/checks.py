"""What the center's ops accept, refused with the reason before anything is kept, whoever
answers them: a d3arrow center or Redis (see :mod:`d3arrow.metadata`)."""

from itertools import repeat

from .addressing import normalize_address
from .keys import owner_of


def check_registration(address, ncores, name=None):
    if not isinstance(address, str) or normalize_address(address) != address:
        raise ValueError(f"a worker registers with its address 'host:port', not {address!r}")
    if type(ncores) is not int or ncores < 1:
        raise ValueError(f"ncores must be a positive integer, not {ncores!r}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"a worker's name is a string, not {name!r}")


def check_owner(owner):
    if not (isinstance(owner, str) and owner_of(owner + "-") == owner):
        raise ValueError(f"a client names itself by 16 hex digits, not {short(owner)}")


def check_keys(keys, nbytes=None):
    """Lists of strings only (and sizes as integers). Each key is looked at in C: the
    center reads every result's key (a map of 10,000 sends 10,000)."""
    if not isinstance(keys, (list, tuple)) or not all(map(isinstance, keys, repeat(str))):
        raise ValueError(f"expected a list of strings, got {short(keys)}")
    if nbytes is not None and not (
            isinstance(nbytes, dict) and all(map(isinstance, nbytes, repeat(str)))
            and set(map(type, nbytes.values())) <= {int}):
        raise ValueError(f"nbytes must map keys to integers, got {short(nbytes)}")


def check_believed(believed):
    """``{address: [key]}``: strings only."""
    if not isinstance(believed, dict) or not all(isinstance(a, str) for a in believed):
        raise ValueError(f"expected {{address: [key]}}, got {short(believed)}")
    for keys in believed.values():
        check_keys(keys)


def check_publish(name, key):
    if not isinstance(name, str) or not isinstance(key, str):
        raise ValueError(f"publish takes a name and a key (strings), not {name!r}, {key!r}")


def short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
