"""Addresses: parsed and formatted here and nowhere else.

Internally an address is the string ``'host:port'`` (``'[::1]:port'`` for IPv6): hashable,
msgpack-friendly, and the form users type. The public Pool API also shows ``(host, port)``.
"""

import ipaddress

DEFAULT_HOST = "127.0.0.1"


def parse_address(address):
    """Return ``(host, port)`` from ``'host:port'``, ``(host, port)`` or ``'[v6]:port'``."""
    if isinstance(address, (tuple, list)):
        host, port = address
        return str(host), int(port)
    if not isinstance(address, str):
        raise TypeError(f"an address is 'host:port' or (host, port), not {address!r}")
    text = address.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"cannot parse address {address!r}: expected 'host:port'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(host, port):
    """The internal form of an address."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def normalize_address(address):
    """Any accepted form to the internal ``'host:port'`` string."""
    return format_address(*parse_address(address))


def address_tuple(address):
    """The public ``(host, port)`` form."""
    return parse_address(address)


def is_loopback(host):
    """Whether ``host`` reaches this machine only (binding it exposes nothing)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
