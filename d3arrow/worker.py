"""A worker: serves a dict of values, computes on them, fetches missing inputs from peers.

User functions run in a thread pool of ``ncores`` threads, so the event loop keeps serving
data and heartbeats while they run. Missing inputs are located through the center (or the
caller's hints) and fetched from several peers at once.

Large arrays and Arrow tables live in the worker's shared store (see :mod:`d3arrow.store`):
results are copied there once, values arriving over TCP are received straight into it, and
a co-located peer gets only a reference and views the same memory.
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .center_link import CenterLink
from .comm import CONNECT_TIMEOUT
from .core import ConnectionPool, Server, Tasks, error_reply, peer_timeout
from .fetching import PeerFetcher
from .protocol import allocate_buffers
from .security import NO_SECURITY, Security
from .serialize import Serialized, is_plain, serialize
from .store import SharedStore, load
from .task import KeyRef, map_leaves
from .values import Values

logger = logging.getLogger(__name__)

LARGE_BYTES = 2**20  # (de)serializing more than this moves off the event loop
INLINE_BYTES = 1024  # results this small travel back in the compute reply as well


class Worker(Server):
    """Data and compute server.

    State
    -----
    values : Values, ``{key: value}`` with sizes and shared-memory references
    store : SharedStore or None (``shm=False``, or no shared memory on this system)
    link : CenterLink, registration, heartbeats and key updates
    fetcher : PeerFetcher, inputs brought from peers
    ncores : int, threads that run user functions
    center : str, the center's address

    Ops: get_data, update_data, delete_data, compute, fetch, keys, identity.
    """

    def __init__(self, center: str, *, ncores: int | None = None, name: str | None = None,
                 shm: bool = True, shm_size: int | None = None,
                 security: Security = NO_SECURITY) -> None:
        self.store = _open_store(shm_size, shared=shm)
        allocate = self.store.allocate_payloads if self.store else allocate_buffers
        super().__init__(allocate=allocate, security=security)
        self.center = center
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.values = Values()
        self._moving = {}  # key -> its copy into the shared store, while it is made
        self.executor = ThreadPoolExecutor(self.ncores, thread_name_prefix="d3arrow-compute")
        self.peer_timeout = peer_timeout()  # a peer silent this long is skipped
        self.pool = ConnectionPool(allocate=allocate, security=security,  # center and peers
                                   connect_timeout=min(self.peer_timeout, CONNECT_TIMEOUT),
                                   on_failure=self._peer_failed)
        self._tasks = Tasks()
        self.link = CenterLink(center, self.pool, self.values, security=security,
                               on_release=lambda keys: self.delete_data(keys=keys))
        self.fetcher = PeerFetcher(self.values, self.pool, self.link, receive=self._receive,
                                   host=self.store.host if self.store else None,
                                   peer_timeout=self.peer_timeout, tasks=self._tasks)
        self.handlers = {
            "get_data": self.get_data,
            "update_data": self.update_data,
            "delete_data": self.delete_data,
            "compute": self.compute,
            "fetch": self.fetch,
            "keys": self.keys,
            "identity": self.identity,
        }

    def _peer_failed(self, address: str) -> None:
        if address != self.center:
            self.fetcher.unreachable.add(address)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        await self.listen(host, port)
        await self.register_with_center()
        return self.address

    async def register_with_center(self) -> None:
        """Register (with any keys already held) and start heartbeating."""
        await self.link.start(self.address, ncores=self.ncores, name=self.name)
        logger.info("worker %s (%d cores, store %s) registered with center %s", self.address,
                    self.ncores, "shared" if self.store and self.store.shared else "private",
                    self.center)

    async def close(self, *, report: bool = True, grace: float = 0.0) -> None:
        """Stop: finish requests in hand (at most ``grace`` s), unregister, free the store."""
        if grace:
            await self.drain(grace)
        await self._tasks.close()
        await self.link.close(unregister=report)
        await super().close()
        self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    def _share(self, value):
        """``(value, ref_meta)``: the value moved into the shared store when worth it."""
        if self.store is not None:
            shared = self.store.put_value(value)
            if shared is not None:
                return shared
        return value, None

    async def _receive(self, serialized, peer=None):
        """``(value, ref_meta)`` for a value that arrived in a message (from ``peer``)."""
        if serialized.meta.get("kind") == "shm":  # a view of a co-located peer's memory
            ref_meta = {k: v for k, v in serialized.meta.items() if k not in ("pin", "token")}
            return load(serialized, peer=peer), ref_meta
        if self.store is not None:
            adopted = self.store.adopt(serialized)  # received straight into our store
            if adopted is not None:
                return adopted
        return await self._load(serialized), None

    async def _wire_form(self, key, host, session):
        """How to send a value: a reference for a co-located reader, else its bytes.

        ``session`` is the reader's token for its session with our store, if it has one:
        then we pin the object for it now, saving it a round trip.
        """
        if host is not None and self.store is not None and host == self.store.host:
            ref_meta = self.values.ref_meta(key) or await self._move_to_store(key)
            if ref_meta is not None:
                if session is not None and ref_meta["socket"] == self.store.socket_name:
                    pin = self.store.pin_for(session, ref_meta["id"])
                    if pin is not None:
                        ref_meta = {**ref_meta, "pin": pin, "token": session}
                return Serialized(ref_meta, [])
        value = self.values[key]
        if isinstance(value, np.ndarray) or self.values.nbytes(key) < LARGE_BYTES:
            return serialize(value)  # arrays serialize without copying: no need to wait
        return await asyncio.get_running_loop().run_in_executor(None, serialize, value)

    async def _move_to_store(self, key):
        """Share a result a co-located reader asks for: its ref meta, or None if it stays
        private. Results are computed into private memory and moved only when a reader on
        this host wants them, so those used where they were made are never copied."""
        value = self.values[key]
        if not self.store.shareable(value):
            return None
        moving = self._moving.get(key)
        if moving is None:  # the first reader's request copies it; others wait for that
            moving = self._moving[key] = asyncio.get_running_loop().run_in_executor(
                None, self._share, value)
            moving.add_done_callback(lambda _: self._moving.pop(key, None))
        view, ref_meta = await asyncio.shield(moving)
        if ref_meta is not None and key in self.values and self.values[key] is value:
            self.values.put(key, view, ref_meta)
        return self.values.ref_meta(key) if key in self.values else None

    # -- ops ---------------------------------------------------------------------------------

    async def get_data(self, *, keys, host=None, session=None):
        """Values by key; to a reader on our host (``host``), shared-memory references."""
        data = {k: await self._wire_form(k, host, session) for k in keys if k in self.values}
        missing = [k for k in keys if k not in data]
        if missing:
            return {"status": "missing-data", "keys": missing, "data": data}
        return {"data": data}

    async def update_data(self, *, data, report=True):
        for key, value in data.items():
            self.values.put(key, *await self._receive(value))
        if report:
            await self.link.tell("add_keys", list(data), applied=True)
        return {"keys": list(data), "nbytes": self.values.nbytes_of(data)}

    async def delete_data(self, *, keys, report=True):
        deleted = [k for k in keys if self.values.discard(k)]
        if report:
            await self.link.tell("remove_keys", deleted, applied=True)
        return {"keys": deleted}

    async def undelivered(self, reply):
        """Results nobody received are nobody's: drop them rather than hold them forever."""
        keys = [r["key"] for r in reply.get("results", ()) if r.get("status") == "OK"]
        if keys:
            logger.info("the caller hung up before %d results reached it: dropping them",
                        len(keys))
            await self.delete_data(keys=keys)

    def keys(self):
        return {"keys": list(self.values)}

    def identity(self):
        return {"role": "worker", "address": self.address, "name": self.name,
                "ncores": self.ncores, "center": self.center, "nkeys": len(self.values),
                "host": self.store.host if self.store else None,
                "store": self.store.info() if self.store else None}

    async def fetch(self, *, keys, who_has=None):
        """Hold these keys here too: fetch those we lack from their holders.

        The reply's ``seconds`` is how long the fetching took here, for benchmarks.
        """
        start = time.perf_counter()
        missing = await self.fetcher.gather(keys, who_has or {})
        if missing:
            return {"status": "missing-data", "keys": sorted(missing)}
        return {"nbytes": self.values.nbytes_of(keys),
                "seconds": time.perf_counter() - start}

    async def compute(self, *, function, keys, args, kwargs=None, needed=None, who_has=None):
        """Run ``function`` once per key; store each result under its key.

        ``args`` (and ``kwargs``) is one serialized list with an entry per key, so a batch
        of small calls costs one deserialization. Entries may hold :class:`KeyRef` s to the
        keys listed for that call in ``needed``, which are fetched first (``who_has`` may
        say where they are). Each call gets a result entry: ``OK`` with the result's
        ``nbytes`` and ``type``, ``missing-data`` with the keys no live worker holds, or
        ``error``. ``seconds`` is the time spent running the function.
        """
        needed = needed or [()] * len(keys)
        missing = await self.fetcher.gather({k for ks in needed for k in ks}, who_has or {})
        try:
            func = await self._load(function)
            calls = await self._load(args)
            call_kwargs = await self._load(kwargs) if kwargs is not None else [None] * len(keys)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # what unpickling ran was user code too
            return {"results": [{"key": key, **error_reply(e)} for key in keys], "seconds": 0.0}
        runnable = [i for i, ks in enumerate(needed) if not missing.intersection(ks)]
        # one trip to the thread pool per core, not per call: small calls stay cheap
        chunks = [runnable[i::self.ncores] for i in range(min(self.ncores, len(runnable)))]
        loop = asyncio.get_running_loop()
        run = lambda chunk: loop.run_in_executor(  # noqa: E731
            self.executor, self._execute, func, calls, call_kwargs, chunk)
        done = [await run(chunks[0])] if len(chunks) == 1 else await asyncio.gather(
            *map(run, chunks))
        outcomes = {i: outcome for part, _ in done for i, outcome in part}
        results = []
        for i, key in enumerate(keys):
            if i not in outcomes:
                results.append({"key": key, "status": "missing-data",
                                "keys": sorted(missing.intersection(needed[i])),
                                "unreachable": self.fetcher.unreachable.recent()})
            elif outcomes[i][0] == "error":
                results.append({"key": key, **outcomes[i][1]})
            else:
                _, value, ref_meta = outcomes[i]
                self.values.put(key, value, ref_meta)
                result = {"key": key, "status": "OK", "nbytes": self.values.nbytes(key),
                          "type": type(value).__name__}
                # small results travel back too, saving the caller a round trip; only where
                # the size is known (getsizeof of a dict says nothing of the arrays inside)
                if is_plain(value) and self.values.nbytes(key) <= INLINE_BYTES:
                    result["plain"] = value
                elif type(value) is np.ndarray and value.nbytes <= INLINE_BYTES:
                    result["value"] = serialize(value)
                results.append(result)
        # written before our reply: the center hears of the results first
        await self.link.tell("add_keys", [r["key"] for r in results if r["status"] == "OK"])
        return {"results": results, "seconds": sum(seconds for _, seconds in done)}

    def _execute(self, func, calls, call_kwargs, indices):
        """Run the calls at ``indices`` in this thread: ``([(i, outcome)], seconds)``."""
        start = time.perf_counter()
        substitute = lambda ref: self.values[ref.key]  # noqa: E731
        outcomes = []
        for i in indices:
            try:
                args = map_leaves(calls[i], KeyRef, substitute)
                kwargs = map_leaves(call_kwargs[i], KeyRef, substitute) or {}
                outcomes.append((i, ("OK", func(*args, **kwargs), None)))
            except BaseException as e:  # SystemExit too: an error of this call, not ours
                outcomes.append((i, ("error", error_reply(e))))
        return outcomes, time.perf_counter() - start

    async def _load(self, serialized):
        """Deserialize; large values in a thread, so the loop keeps serving meanwhile."""
        if serialized.nbytes < LARGE_BYTES or serialized.meta.get("kind") in ("tensor", "shm"):
            return load(serialized)
        return await asyncio.get_running_loop().run_in_executor(None, load, serialized)


def _open_store(capacity, shared):
    """The worker's store; without shared memory, one that only receives (or none)."""
    try:
        return SharedStore(capacity, shared=shared)
    except (OSError, AttributeError) as e:  # no memfd_create, no memory, no Unix sockets
        if shared:
            logger.warning("no shared-memory store (%s): co-located workers will use TCP", e)
            return _open_store(capacity, shared=False)
        logger.warning("no receive arena (%s): receiving into fresh memory", e)
        return None
