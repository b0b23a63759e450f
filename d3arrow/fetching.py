"""Fetching the values a worker lacks from the peers that hold them.

Holders come from the caller's hints, else from the center (asked again a moment later
about keys it does not know yet: workers tell it of results in batches). Keys go to several peers at
once; a key wanted by several requests at once travels once. A peer that fails (dead,
refusing, or silent for the peer timeout) is skipped and remembered for a while, so the
worker can tell its callers which peers it found gone.
"""

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable, Iterable

from .center_link import ASK_AGAIN_SECONDS, CenterLink
from .core import ConnectionPool, RecentFailures, Tasks
from .transfer import get_data
from .values import Values

logger = logging.getLogger(__name__)

# a key nobody we know of holds: asked of the center this many times, the second after
# ASK_AGAIN_SECONDS
CENTER_ASKS = 2


class PeerFetcher:
    """Brings values to this worker from their holders.

    Parameters
    ----------
    values : Values
        Where fetched values are kept.
    pool : ConnectionPool
        Connections to the peers.
    link : CenterLink
        Asked who holds what, and told of the copies made here.
    receive : async callable(serialized, peer) -> (value, ref_meta)
        Turns what a peer sent into what is kept (a view of shared memory, or adopted).
    host : str or None
        Our host id: co-located peers answer with shared-memory references.
    peer_timeout : float
        Seconds of a peer's silence (connecting included) before it is skipped.
    """

    def __init__(self, values: Values, pool: ConnectionPool, link: CenterLink, *,
                 receive: Callable[[object, str], Awaitable[tuple]], host: str | None,
                 peer_timeout: float, tasks: Tasks) -> None:
        self.values = values
        self.pool = pool
        self.link = link
        self.receive = receive
        self.host = host
        self.peer_timeout = peer_timeout
        self.unreachable = RecentFailures()  # told to callers with missing-data (the
        # worker's connection pool adds the peers that failed it)
        self._tasks = tasks
        self._fetching: dict[str, asyncio.Task] = {}  # key -> the task fetching it

    async def gather(self, keys: Iterable[str], who_has: dict) -> set[str]:
        """Fetch the keys not held here; return those that no live worker could provide."""
        wanted = self.values.lacking(keys)
        if not wanted:
            return set()
        wanted = list(dict.fromkeys(wanted))
        new = [k for k in wanted if k not in self._fetching]
        if new:
            task = self._tasks.spawn(self._fetch(new, who_has), "fetching from peers")
            for key in new:
                self._fetching[key] = task
            task.add_done_callback(lambda _: [self._fetching.pop(k, None) for k in new])
        pending = {self._fetching[k] for k in wanted if k in self._fetching}
        if pending:
            await asyncio.gather(*pending)
        return {k for k in wanted if k not in self.values}

    async def _fetch(self, keys: list[str], who_has: dict) -> None:
        me = self.link.address
        holders = {k: [a for a in who_has.get(k, ()) if a != me] for k in keys}
        tried = collections.defaultdict(set)
        asked_center = 0
        remaining = set(keys)
        fetched = []
        while remaining:
            plan = collections.defaultdict(list)
            for key in remaining:
                untried = [a for a in holders[key] if a not in tried[key]]
                if untried:
                    plan[random.choice(untried)].append(key)
            if not plan:
                if asked_center == CENTER_ASKS:
                    break
                if asked_center:  # results reach the center in batches: it may know soon
                    await asyncio.sleep(ASK_AGAIN_SECONDS)
                asked_center += 1
                reply = await self.link.rpc.who_has(keys=list(remaining))
                for key, addresses in reply["who_has"].items():
                    holders[key] = [a for a in addresses if a != me]
                continue
            for peer, peer_keys in plan.items():
                for key in peer_keys:
                    tried[key].add(peer)
            if len(plan) == 1:  # one peer (the usual case): no task to gather
                ((peer, peer_keys),) = plan.items()
                replies = [await self._get_from_peer(peer, peer_keys)]
            else:
                replies = await asyncio.gather(*(
                    self._get_from_peer(peer, peer_keys) for peer, peer_keys in plan.items()))
            for data in replies:
                for key, (value, ref_meta) in data.items():
                    self.values.put(key, value, ref_meta)
                    fetched.append(key)
                    remaining.discard(key)
        await self.link.tell("add_keys", fetched)

    async def _get_from_peer(self, peer: str, keys: list[str]) -> dict:
        """{key: (value, ref_meta)} for the keys ``peer`` could give us."""
        return await get_data(self.pool, peer, keys, host=self.host, receive=self.receive,
                              timeout=self.peer_timeout)
