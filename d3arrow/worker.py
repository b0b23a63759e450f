"""A worker: serves a dict of values, computes on them, fetches missing inputs from peers.

User functions run in a thread pool of ``ncores`` threads, so the event loop keeps serving
data and heartbeats while they run. Missing inputs are located through the center (or the
caller's hints) and fetched from several peers at once.
"""

import asyncio
import collections
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor

from .core import DEFAULT_TIMEOUT, HEARTBEAT_INTERVAL, ConnectionPool, Server, error_reply
from .errors import CommClosedError
from .serialize import deserialize, nbytes, serialize
from .task import KeyRef, map_leaves

logger = logging.getLogger(__name__)


class Worker(Server):
    """Data and compute server.

    State
    -----
    data : {key: value}
    nbytes : {key: int}
    ncores : int, threads that run user functions
    center : str, the center's address

    Ops: get_data, update_data, delete_data, compute, keys, identity.
    """

    def __init__(self, center, *, ncores=None, name=None):
        super().__init__()
        self.center = center
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.data = {}
        self.nbytes = {}
        self.executor = ThreadPoolExecutor(self.ncores, thread_name_prefix="d3arrow-compute")
        self.pool = ConnectionPool()
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self._fetching = {}  # key -> task fetching it, so concurrent needs share one transfer
        self._heartbeat_task = None
        self.handlers = {
            "get_data": self.get_data,
            "update_data": self.update_data,
            "delete_data": self.delete_data,
            "compute": self.compute,
            "keys": self.keys,
            "identity": self.identity,
        }

    @property
    def _center(self):
        return self.pool.rpc(self.center, timeout=DEFAULT_TIMEOUT)

    async def start(self, host="127.0.0.1", port=0):
        await self.listen(host, port)
        await self.register_with_center()
        return self.address

    async def register_with_center(self):
        """Register (with any keys already held) and start heartbeating."""
        await self._register()
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def close(self, *, report=True):
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if report:
            try:
                await asyncio.wait_for(self._center.unregister(address=self.address), 2)
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("could not unregister from center %s: %s", self.center, e)
        await super().close()
        self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _register(self):
        reply = await self._center.register(
            address=self.address, ncores=self.ncores, name=self.name,
            keys=list(self.data), nbytes=self.nbytes)
        self.heartbeat_interval = reply.get("heartbeat_interval", HEARTBEAT_INTERVAL)

    async def _heartbeat(self):
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                reply = await self._center.heartbeat(address=self.address)
                if reply["status"] == "unknown-worker":
                    logger.warning("center %s forgot this worker: registering again", self.center)
                    await self._register()
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.warning("heartbeat to center %s failed: %s", self.center, e)

    async def _report_keys(self, keys):
        if keys:
            reply = await self._center.add_keys(
                address=self.address, keys=keys, nbytes={k: self.nbytes[k] for k in keys})
            if reply["status"] == "unknown-worker":
                await self._register()

    def _store(self, key, value):
        self.data[key] = value
        self.nbytes[key] = nbytes(value)

    # -- ops ---------------------------------------------------------------------------------

    def get_data(self, *, keys):
        data = {k: serialize(self.data[k]) for k in keys if k in self.data}
        missing = [k for k in keys if k not in data]
        if missing:
            return {"status": "missing-data", "keys": missing, "data": data}
        return {"data": data}

    async def update_data(self, *, data, report=True):
        for key, value in data.items():
            self._store(key, deserialize(value))
        if report:
            await self._report_keys(list(data))
        return {"keys": list(data), "nbytes": {k: self.nbytes[k] for k in data}}

    async def delete_data(self, *, keys, report=True):
        deleted = [k for k in keys if k in self.data]
        for key in deleted:
            del self.data[key]
            del self.nbytes[key]
        if report and deleted:
            await self._center.remove_keys(address=self.address, keys=deleted)
        return {"keys": deleted}

    def keys(self):
        return {"keys": list(self.data)}

    def identity(self):
        return {"address": self.address, "name": self.name, "ncores": self.ncores,
                "center": self.center, "nkeys": len(self.data)}

    async def compute(self, *, function, tasks, who_has=None):
        """Run ``function`` once per task; store each result under the task's key.

        ``tasks`` is a list of ``{"key", "args", "kwargs", "needed"}``: ``args`` and
        ``kwargs`` are serialized and may hold :class:`KeyRef` s to the ``needed`` keys,
        which are fetched first (``who_has`` may say where they are). Each task gets its
        own result entry: ``OK`` with the result's ``nbytes`` and ``type``,
        ``missing-data`` with the keys no live worker holds, or ``error``.
        """
        needed = {key for task in tasks for key in task.get("needed", ())}
        missing = await self.gather_dependencies(needed, who_has or {})
        loop = asyncio.get_running_loop()
        try:
            func = deserialize(function)
        except Exception as e:
            return {"results": [error_reply(e) for _ in tasks]}
        results = await asyncio.gather(*(
            self._run_task(loop, func, task, missing) for task in tasks))
        await self._report_keys([r["key"] for r in results if r["status"] == "OK"])
        return {"results": results}

    async def _run_task(self, loop, func, task, missing):
        key = task["key"]
        lost = [k for k in task.get("needed", ()) if k in missing]
        if lost:
            return {"key": key, "status": "missing-data", "keys": lost}
        try:
            result = await loop.run_in_executor(self.executor, self._execute, func, task)
        except Exception as e:
            return {"key": key, **error_reply(e)}
        self._store(key, result)
        return {"key": key, "status": "OK", "nbytes": self.nbytes[key],
                "type": type(result).__name__}

    def _execute(self, func, task):
        substitute = lambda ref: self.data[ref.key]  # noqa: E731
        args = map_leaves(deserialize(task["args"]), KeyRef, substitute)
        kwargs = task.get("kwargs")
        kwargs = map_leaves(deserialize(kwargs), KeyRef, substitute) if kwargs else {}
        return func(*args, **kwargs)

    # -- peer to peer ------------------------------------------------------------------------

    async def gather_dependencies(self, keys, who_has):
        """Fetch the keys not held here; return those that no live worker could provide."""
        wanted = [k for k in keys if k not in self.data]
        new = [k for k in wanted if k not in self._fetching]
        if new:
            task = asyncio.get_running_loop().create_task(self._fetch(new, who_has))
            for key in new:
                self._fetching[key] = task
            task.add_done_callback(lambda _: [self._fetching.pop(k, None) for k in new])
        pending = {self._fetching[k] for k in wanted if k in self._fetching}
        if pending:
            await asyncio.gather(*pending)
        return {k for k in wanted if k not in self.data}

    async def _fetch(self, keys, who_has):
        holders = {k: [a for a in who_has.get(k, ()) if a != self.address] for k in keys}
        tried = collections.defaultdict(set)
        asked_center = False
        remaining = set(keys)
        fetched = []
        while remaining:
            plan = collections.defaultdict(list)
            for key in remaining:
                untried = [a for a in holders[key] if a not in tried[key]]
                if untried:
                    plan[random.choice(untried)].append(key)
            if not plan:
                if asked_center:
                    break
                asked_center = True
                reply = await self._center.who_has(keys=list(remaining))
                for key, addresses in reply["who_has"].items():
                    holders[key] = [a for a in addresses if a != self.address]
                continue
            for peer, peer_keys in plan.items():
                for key in peer_keys:
                    tried[key].add(peer)
            replies = await asyncio.gather(*(
                self._get_from_peer(peer, peer_keys) for peer, peer_keys in plan.items()))
            for data in replies:
                for key, value in data.items():
                    self._store(key, value)
                    fetched.append(key)
                    remaining.discard(key)
        await self._report_keys(fetched)

    async def _get_from_peer(self, peer, keys):
        try:
            reply = await self.pool.rpc(peer).get_data(keys=keys)
        except (OSError, CommClosedError) as e:
            logger.warning("could not fetch %d keys from %s: %s", len(keys), peer, e)
            return {}
        return {key: deserialize(value) for key, value in reply["data"].items()}
