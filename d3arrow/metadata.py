"""Where the cluster's metadata lives: a d3arrow center ('host:port') or a Redis server
('redis://host:port/db').

:func:`center_rpc` is the one way the client and the worker reach it: an object whose
coroutine methods are the center's ops, returning the center's replies. For a center it is
the connection pool's rpc proxy; for Redis, a :class:`~d3arrow.redis_center.RedisCenter`
(one per event loop: its connections belong to the loop that made them).
"""

import asyncio
import weakref

from .addressing import normalize_address
from .redis_center import RedisCenter, is_redis, shown  # noqa: F401 (shown: for messages)

_redis_centers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # loop -> {url: RC}


def center_address(address) -> str:
    """The internal form of a center's address: 'host:port', or a Redis URL as given."""
    return address if is_redis(address) else normalize_address(address)


def center_rpc(pool, address, *, timeout=None):
    """The center's ops at ``address``, through ``pool`` for a d3arrow center."""
    if is_redis(address):
        by_url = _redis_centers.setdefault(asyncio.get_running_loop(), {})
        center = by_url.get(address)
        if center is None:
            center = by_url[address] = RedisCenter(address)
        return _Replies(center)
    return pool.rpc(address, timeout=timeout)


class _Replies:
    """A RedisCenter's ops with the replies a center's server gives: a dict with a
    ``status`` ("OK" unless the op says otherwise)."""

    def __init__(self, center):
        self._center = center

    def __getattr__(self, op):
        method = getattr(self._center, op)

        async def call(**kwargs):
            reply = await method(**kwargs) or {}
            reply.setdefault("status", "OK")
            return reply
        return call


async def close_center_rpc(address):
    """Close this loop's connections to a Redis center (nothing to do for a center)."""
    if is_redis(address):
        center = _redis_centers.get(asyncio.get_running_loop(), {}).pop(address, None)
        if center is not None:
            await center.close()
