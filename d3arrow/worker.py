"""A worker: serves a dict of values, computes on them, fetches missing inputs from peers.

User functions run in a thread pool of ``ncores`` threads, so the event loop keeps serving
data and heartbeats while they run. Missing inputs are located through the center (or the
caller's hints) and fetched from several peers at once.

Large arrays and Arrow tables live in the worker's shared store (see :mod:`d3arrow.store`):
results are copied there once, values arriving over TCP are received straight into it, and
a co-located peer gets only a reference and views the same memory.
"""

import asyncio
import collections
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .comm import CONNECT_TIMEOUT, connect
from .core import (DEFAULT_TIMEOUT, HEARTBEAT_INTERVAL, ConnectionPool, RecentFailures,
                   Server, error_reply, log_failure, peer_timeout)
from .errors import CommClosedError
from .protocol import allocate_buffers
from .security import NO_SECURITY
from .serialize import Serialized, is_plain, nbytes, serialize
from .store import SharedStore, get_data, load
from .task import KeyRef, map_leaves

logger = logging.getLogger(__name__)

LARGE_BYTES = 2**20  # (de)serializing more than this moves off the event loop
INLINE_BYTES = 1024  # results this small travel back in the compute reply as well
MAX_BACKOFF_FACTOR = 4  # while the center is unreachable, retry at most 4 heartbeats apart


class Worker(Server):
    """Data and compute server.

    State
    -----
    data : {key: value}
    nbytes : {key: int}
    shared : {key: ref meta}, for values in shared memory (ours or a co-located peer's)
    store : SharedStore or None (``shm=False``, or no shared memory on this system)
    ncores : int, threads that run user functions
    center : str, the center's address

    Ops: get_data, update_data, delete_data, compute, fetch, keys, identity.
    """

    def __init__(self, center, *, ncores=None, name=None, shm=True, shm_size=None,
                 security=NO_SECURITY):
        self.store = _open_store(shm_size, shared=shm)
        allocate = self.store.allocate_payloads if self.store else allocate_buffers
        super().__init__(allocate=allocate, security=security)
        self.center = center
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.data = {}
        self.nbytes = {}
        self.shared = {}
        self.executor = ThreadPoolExecutor(self.ncores, thread_name_prefix="d3arrow-compute")
        self.peer_timeout = peer_timeout()  # a peer silent this long is skipped
        self.pool = ConnectionPool(allocate=allocate, security=security,  # center and peers
                                   connect_timeout=min(self.peer_timeout, CONNECT_TIMEOUT))
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self._fetching = {}  # key -> task fetching it, so concurrent needs share one transfer
        self._updates_comm = None  # a connection to the center for add/remove_keys only
        self._updates_pending = collections.deque()  # their answers, in order
        self._updates_lock = asyncio.Lock()
        self._updates_reader = None
        self._registering = None
        self._heartbeat_task = None
        self._closing = False
        self._unreachable_peers = RecentFailures()  # told to callers with missing-data
        self.handlers = {
            "get_data": self.get_data,
            "update_data": self.update_data,
            "delete_data": self.delete_data,
            "compute": self.compute,
            "fetch": self.fetch,
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
        logger.info("worker %s (%d cores, store %s) registered with center %s", self.address,
                    self.ncores, "shared" if self.store and self.store.shared else "private",
                    self.center)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def close(self, *, report=True, grace=0.0):
        """Stop: finish requests in hand (at most ``grace`` s), unregister, free the store."""
        self._closing = True
        if grace:
            await self.drain(grace)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        for task in (self._updates_reader, self._registering):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._updates_comm is not None:
            self._updates_comm.abort()
        if report:
            try:
                await asyncio.wait_for(self._center.unregister(address=self.address), 2)
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("could not unregister from center %s: %s", self.center, e)
        await super().close()
        self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    async def _register(self):
        reply = await self._center.register(
            address=self.address, ncores=self.ncores, name=self.name,
            keys=list(self.data), nbytes=self.nbytes)
        self.heartbeat_interval = reply.get("heartbeat_interval", HEARTBEAT_INTERVAL)

    async def _heartbeat(self):
        """Heartbeats; while the center is away, retries that back off, then registration.

        A restarted center knows nothing: it answers ``unknown-worker`` and we register
        again with every key we hold, so its ``who_has`` is whole again.
        """
        failures = 0
        while True:
            delay = self.heartbeat_interval * min(2 ** failures, MAX_BACKOFF_FACTOR)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0) if failures else delay)
            try:
                reply = await self._center.heartbeat(address=self.address)
                if reply["status"] == "unknown-worker":
                    self._register_again()
                elif reply.get("release"):  # values of clients that are gone
                    logger.info("freeing %d values whose client is gone", len(reply["release"]))
                    await self.delete_data(keys=reply["release"])
                failures = 0
            except (OSError, TimeoutError, CommClosedError) as e:
                failures += 1
                (logger.warning if failures == 1 else logger.info)(
                    "heartbeat to center %s failed (%d in a row): %s", self.center, failures, e)

    async def _tell_center(self, op, keys, *, applied=False):
        """Tell the center of keys added here or removed; it hears of them in call order.

        Updates travel over one connection kept for them and are written at once: an update
        made before our reply to a caller reaches the center first, with no round trip in
        between. Their answers are read in order in the background. With ``applied``, wait
        until the center has applied this update.
        """
        keys = [k for k in keys if k in self.data] if op == "add_keys" else list(keys)
        if not keys:
            return
        msg = {"op": op, "address": self.address, "keys": keys}
        if op == "add_keys":
            msg["nbytes"] = {k: self.nbytes[k] for k in keys}
        try:
            comm = self._updates_comm
            if comm is None or comm.closed:
                comm = await self._open_updates_link()
            answered = asyncio.get_running_loop().create_future()
            self._updates_pending.append(answered)
            await comm.send(msg, silence=DEFAULT_TIMEOUT)
        except (OSError, TimeoutError, CommClosedError) as e:
            logger.warning("could not tell center %s of %d keys: %s", self.center, len(keys), e)
            return
        if applied:
            try:
                await asyncio.wait_for(asyncio.shield(answered), DEFAULT_TIMEOUT)
            except TimeoutError:
                logger.warning("center %s did not apply an update within %s s", self.center,
                               DEFAULT_TIMEOUT)

    async def _open_updates_link(self):
        async with self._updates_lock:
            if self._updates_comm is None or self._updates_comm.closed:
                comm = await connect(self.center, security=self.security)
                self._updates_comm, self._updates_pending = comm, collections.deque()
                self._updates_reader = asyncio.get_running_loop().create_task(
                    self._read_update_answers(comm, self._updates_pending))
            return self._updates_comm

    async def _read_update_answers(self, comm, pending):
        try:
            while True:
                answer = await comm.recv()
                answered = pending.popleft()
                if isinstance(answer, dict) and answer.get("status") == "unknown-worker":
                    self._register_again()  # a restarted center: it gets every key we hold
                elif not isinstance(answer, dict) or answer.get("status") != "OK":
                    logger.warning("center %s refused an update: %s", self.center,
                                   answer.get("message") if isinstance(answer, dict) else answer)
                answered.done() or answered.set_result(answer)
        except (CommClosedError, IndexError):
            pass
        finally:
            comm.abort()
            for answered in pending:  # not applied: re-registration will tell it all
                answered.done() or answered.set_result(None)

    def _register_again(self):
        if self._closing or (self._registering is not None and not self._registering.done()):
            return
        logger.warning("center %s does not know this worker: registering again with %d keys",
                       self.center, len(self.data))
        self._registering = asyncio.get_running_loop().create_task(self._register())
        self._registering.add_done_callback(log_failure("registering again with the center"))

    def _store(self, key, value, ref_meta=None):
        self.data[key] = value
        self.nbytes[key] = nbytes(value)
        if ref_meta is None:
            self.shared.pop(key, None)
        else:
            self.shared[key] = ref_meta

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
            ref_meta = self.shared.get(key)
            if ref_meta is not None:
                if session is not None and ref_meta["socket"] == self.store.socket_name:
                    pin = self.store.pin_for(session, ref_meta["id"])
                    if pin is not None:
                        ref_meta = {**ref_meta, "pin": pin, "token": session}
                return Serialized(ref_meta, [])
        value = self.data[key]
        if isinstance(value, np.ndarray) or self.nbytes[key] < LARGE_BYTES:
            return serialize(value)  # arrays serialize without copying: no need to wait
        return await asyncio.get_running_loop().run_in_executor(None, serialize, value)

    # -- ops ---------------------------------------------------------------------------------

    async def get_data(self, *, keys, host=None, session=None):
        """Values by key; to a reader on our host (``host``), shared-memory references."""
        data = {k: await self._wire_form(k, host, session) for k in keys if k in self.data}
        missing = [k for k in keys if k not in data]
        if missing:
            return {"status": "missing-data", "keys": missing, "data": data}
        return {"data": data}

    async def update_data(self, *, data, report=True):
        for key, value in data.items():
            self._store(key, *await self._receive(value))
        if report:
            await self._tell_center("add_keys", list(data), applied=True)
        return {"keys": list(data), "nbytes": {k: self.nbytes[k] for k in data}}

    async def delete_data(self, *, keys, report=True):
        deleted = [k for k in keys if k in self.data]
        for key in deleted:
            del self.data[key]
            del self.nbytes[key]
            self.shared.pop(key, None)
        if report:
            await self._tell_center("remove_keys", deleted, applied=True)
        return {"keys": deleted}

    async def undelivered(self, reply):
        """Results nobody received are nobody's: drop them rather than hold them forever."""
        keys = [r["key"] for r in reply.get("results", ()) if r.get("status") == "OK"]
        if keys:
            logger.info("the caller hung up before %d results reached it: dropping them",
                        len(keys))
            await self.delete_data(keys=keys)

    def keys(self):
        return {"keys": list(self.data)}

    def identity(self):
        return {"role": "worker", "address": self.address, "name": self.name,
                "ncores": self.ncores, "center": self.center, "nkeys": len(self.data),
                "host": self.store.host if self.store else None,
                "store": self.store.info() if self.store else None}

    async def fetch(self, *, keys, who_has=None):
        """Hold these keys here too: fetch those we lack from their holders.

        The reply's ``seconds`` is how long the fetching took here, for benchmarks.
        """
        start = time.perf_counter()
        missing = await self.gather_dependencies(keys, who_has or {})
        if missing:
            return {"status": "missing-data", "keys": sorted(missing)}
        return {"nbytes": {k: self.nbytes[k] for k in keys},
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
        missing = await self.gather_dependencies({k for ks in needed for k in ks},
                                                 who_has or {})
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
                                "unreachable": self._unreachable_peers.recent()})
            elif outcomes[i][0] == "error":
                results.append({"key": key, **outcomes[i][1]})
            else:
                _, value, ref_meta = outcomes[i]
                self._store(key, value, ref_meta)
                result = {"key": key, "status": "OK", "nbytes": self.nbytes[key],
                          "type": type(value).__name__}
                # small results travel back too, saving the caller a round trip; only where
                # the size is known (getsizeof of a dict says nothing of the arrays inside)
                if is_plain(value) and self.nbytes[key] <= INLINE_BYTES:
                    result["plain"] = value
                elif type(value) is np.ndarray and value.nbytes <= INLINE_BYTES:
                    result["value"] = serialize(value)
                results.append(result)
        # written before our reply: the center hears of the results first
        await self._tell_center("add_keys", [r["key"] for r in results if r["status"] == "OK"])
        return {"results": results, "seconds": sum(seconds for _, seconds in done)}

    def _execute(self, func, calls, call_kwargs, indices):
        """Run the calls at ``indices`` in this thread: ``([(i, outcome)], seconds)``."""
        start = time.perf_counter()
        substitute = lambda ref: self.data[ref.key]  # noqa: E731
        outcomes = []
        for i in indices:
            try:
                args = map_leaves(calls[i], KeyRef, substitute)
                kwargs = map_leaves(call_kwargs[i], KeyRef, substitute) or {}
                outcomes.append((i, ("OK", *self._share(func(*args, **kwargs)))))
            except BaseException as e:  # SystemExit too: an error of this call, not ours
                outcomes.append((i, ("error", error_reply(e))))
        return outcomes, time.perf_counter() - start

    async def _load(self, serialized):
        """Deserialize; large values in a thread, so the loop keeps serving meanwhile."""
        if serialized.nbytes < LARGE_BYTES or serialized.meta.get("kind") in ("tensor", "shm"):
            return load(serialized)
        return await asyncio.get_running_loop().run_in_executor(None, load, serialized)

    # -- peer to peer ------------------------------------------------------------------------

    async def gather_dependencies(self, keys, who_has):
        """Fetch the keys not held here; return those that no live worker could provide."""
        wanted = [k for k in keys if k not in self.data]
        if not wanted:
            return set()
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
                for key, (value, ref_meta) in data.items():
                    self._store(key, value, ref_meta)
                    fetched.append(key)
                    remaining.discard(key)
        await self._tell_center("add_keys", fetched)

    async def _get_from_peer(self, peer, keys):
        """{key: (value, ref_meta)} for the keys ``peer`` could give us."""
        return await get_data(self.pool, peer, keys, host=self.store.host if self.store else None,
                              receive=self._receive, timeout=self.peer_timeout,
                              on_failure=self._unreachable_peers.add)


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
