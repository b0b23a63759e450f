"""A worker: serves a dict of values, computes on them, fetches missing inputs from peers.

User functions run in a thread pool of ``ncores`` threads, so the event loop keeps serving
data and heartbeats while they run; a function whose calls have all been quick (under half a
millisecond) runs on the loop, where the hops to a thread and back would cost more than the
call (see :mod:`d3arrow.functions`). Missing inputs are located through the center (or the
caller's hints) and fetched from several peers at once.

Large arrays and Arrow tables live in the worker's shared store (see :mod:`d3arrow.store`):
results are copied there once, values arriving over TCP are received straight into it, and
a co-located peer gets only a reference and views the same memory. With a memory limit
(:mod:`d3arrow.memory`) values beyond it are spilled to disk, and co-located peers map the
spilled files instead.
"""

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .center_link import CenterLink
from .comm import CONNECT_TIMEOUT
from .core import ConnectionPool, Server, Tasks, error_reply, peer_timeout
from .errors import SpillError
from .eventloop import MustLeaveLoop, StayAwake, on_loop
from .fetching import PeerFetcher
from .functions import Function, Functions
from .protocol import allocate_buffers
from .security import NO_SECURITY, Security
from .serialize import PLAIN_TYPES, Serialized, is_plain, serialize, sole_keys
from .spill import adopt_spilled
from .store import SharedDataGone, SharedStore, host_id, load
from .task import KeyRef, map_leaves
from .memory import PAUSE, TARGET, MemoryManager
from .metrics import Counters, LoopLag
from . import numpy_allocator
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
                 security: Security = NO_SECURITY, memory_limit: int | None = None,
                 local_directory: str | None = None, memory_target: float = TARGET,
                 memory_pause: float = PAUSE) -> None:
        if memory_limit and not shm_size:  # the store holds at most what the worker may
            shm_size = memory_limit
        # with a limit, the store holds no memory beyond its values (no faulting in ahead)
        self.store = _open_store(shm_size, shared=shm, tight=bool(memory_limit))
        allocate = self.store.allocate_payloads if self.store else allocate_buffers
        # a caller in a loop (apply) sends its next request right after our answer
        super().__init__(allocate=allocate, security=security, stay_awake=StayAwake())
        self.center = center
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.values = Values(reads_count=memory_limit is not None)
        self._moving = {}  # key -> its copy into the shared store, while it is made
        self._memory_task = None
        self.memory = MemoryManager(
            self.values, memory_limit, directory=local_directory, target=memory_target,
            pause=memory_pause, spillable=self._spillable,
            store_used=self._shared_bytes)
        # Results go to shared memory (no memory limit): numpy makes big arrays there in
        # the first place in the compute threads, so storing one is no copy.
        handler = (numpy_allocator.arena_handler(self.store.arena)
                   if self.store is not None and self.store.shared and not memory_limit
                   else None)
        self.executor = ThreadPoolExecutor(
            self.ncores, thread_name_prefix="d3arrow-compute",
            initializer=numpy_allocator.use if handler else None, initargs=(handler,))
        self.functions = Functions()
        self.peer_timeout = peer_timeout()  # a peer silent this long is skipped
        self.pool = ConnectionPool(allocate=allocate, security=security,  # center and peers
                                   connect_timeout=min(self.peer_timeout, CONNECT_TIMEOUT),
                                   on_failure=self._peer_failed)
        self._tasks = Tasks()
        self.counters = Counters()  # what this worker did, for the center's status
        self.loop_lag = LoopLag()
        self._calls_running = 0
        self.link = CenterLink(center, self.pool, self.values, security=security,
                               on_release=lambda keys: self.delete_data(keys=keys),
                               metrics=self.metrics)
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
            "told": self.told,
        }

    def _peer_failed(self, address: str) -> None:
        if address != self.center:
            self.fetcher.unreachable.add(address)

    async def listen(self, host="127.0.0.1", port=0):
        """Also on a Unix socket, for callers on our host (not with TLS: it names hosts)."""
        return await super().listen(host, port, local=not self.security.tls)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        await self.listen(host, port)
        self._tasks.spawn(self.loop_lag.run(), "measuring the event loop's lag")
        await self.register_with_center()
        return self.address

    async def register_with_center(self) -> None:
        """Register (with any keys already held) and start heartbeating."""
        if self.memory.limit is not None and self._memory_task is None:
            self._memory_task = self._tasks.spawn(self.memory.run(), "keeping under the "
                                                  "memory limit")
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
        self.values.close()

    def _shared_bytes(self):
        """Bytes of values in our shared store (a private receive arena is in RssAnon)."""
        return self.store.arena.used if self.store is not None and self.store.shared else 0

    def metrics(self) -> dict:
        """Totals of what this worker did and gauges of its state now (with each
        heartbeat; see :mod:`d3arrow.metrics`)."""
        memory = self.memory.info()
        store = self.store.info() if self.store is not None else {}
        return {"counters": self.counters.snapshot(), "gauges": {
            "keys": len(self.values), "calls_running": self._calls_running,
            "memory_bytes": memory["memory"], "memory_limit_bytes": memory["limit"] or 0,
            "spilled_bytes": memory["spilled_bytes"], "paused": memory["paused"],
            "store_used_bytes": store.get("used", 0),
            "store_capacity_bytes": store.get("capacity", 0),
            "loop_lag_seconds": self.loop_lag.read(), "connections": self.connections}}

    def _spillable(self, key):
        """Whether a value is ours to spill: not a view of a co-located peer's memory, not
        on its way into our store."""
        if key in self._moving:
            return False
        ref_meta = self.values.ref_meta(key)
        return ref_meta is None or ref_meta.get("socket") == getattr(self.store, "socket_name",
                                                                      None)

    def _hold(self, key, value, *, shared=True, ref_meta=None):
        """Hold a new value: with ``shared``, moved into the shared store when worth it.
        Whether it belongs in the store but the store is full: then the caller spills it
        (:meth:`_spill_overflow`, in a thread) rather than keep it in private memory that
        nothing bounds. With a memory limit results stay private until a local reader asks:
        a copy into the store is memory to account for, and spilled values are shared by
        their files."""
        if type(value) in PLAIN_TYPES:  # a number or short text: never shared
            self.values.put(key, value, ref_meta)
            return False
        if shared and ref_meta is None:
            value, ref_meta = self._share(value)
        self.values.put(key, value, ref_meta)
        return (shared and ref_meta is None and self.store is not None and self.store.shared
                and self.store.shareable(value))

    def _spill_overflow(self, key):
        """Spill a value the full store could not take (blocks on the disk: in a thread)."""
        try:
            self.memory.spill(key)
        except SpillError as e:
            logger.warning("shared store full and cannot spill %s: keeping it in private "
                           "memory (%s)", key, e)

    def _share(self, value):
        """``(value, ref_meta)``: the value moved into the shared store when worth it."""
        if self.store is not None:
            shared = self.store.put_value(value)
            if shared is not None:
                return shared
        return value, None

    def _count_transfer(self, way, serialized, kind):
        """A value sent or received: by reference on this host, or its bytes over TCP."""
        if kind in ("shm", "spilled"):
            self.counters.add(f"values_{way}_shm")
            self.counters.add(f"bytes_{way}_shm", _ref_nbytes(serialized.meta))
        else:
            self.counters.add(f"values_{way}_tcp")
            self.counters.add(f"bytes_{way}_tcp", serialized.nbytes)

    async def _receive(self, serialized, peer=None):
        """``(value, ref_meta)`` for a value that arrived in a message (from ``peer``)."""
        kind = serialized.meta.get("kind")
        self._count_transfer("received", serialized, kind)
        if peer is not None:
            self.counters.add("fetches")
        if kind == "shm":  # a view of a co-located peer's memory
            ref_meta = {k: v for k, v in serialized.meta.items() if k not in ("pin", "token")}
            return load(serialized, peer=peer), ref_meta
        if kind == "spilled":  # a co-located peer's spilled file: we hold it too, unwritten
            try:
                return adopt_spilled(serialized.meta), None
            except SpillError as e:
                raise SharedDataGone(str(e)) from None
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
        if self._on_our_host(host):
            ref_meta = self.values.ref_meta(key) or await self._share_locally(key)
            if ref_meta is not None:
                return self._reference(ref_meta, session)
        value = self.values[key]
        if isinstance(value, np.ndarray) or self.values.nbytes(key) < LARGE_BYTES:
            return serialize(value)  # arrays serialize without copying: no need to wait
        return await asyncio.get_running_loop().run_in_executor(None, serialize, value)

    def _on_our_host(self, host):
        """Whether a reader on ``host`` can view our memory."""
        return host is not None and self.store is not None and host == self.store.host

    def _reference(self, ref_meta, session):
        """A reference for a reader on our host: to an object of our store pinned for the
        reader whose session ``session`` names (it needs no pin round trip) where it can
        be, else as it is."""
        if session is not None and ref_meta.get("socket") == self.store.socket_name:
            pin = self.store.pin_for(session, ref_meta["id"])
            if pin is not None:
                return Serialized({**ref_meta, "pin": pin, "token": session}, [])
        return Serialized(ref_meta, [])

    async def _share_locally(self, key):
        """How a reader on this host views ``key`` in place (its ref meta), or None if it
        travels as bytes: a value in private memory is moved into our store once, however
        many ask at the same time; with a memory limit (or a full store) it is spilled
        instead, and the reader maps its file."""
        value = self.values.raw(key)
        if not self.store.shareable(value):
            return None
        moving = self._moving.get(key)
        if moving is None:
            moving = self._moving[key] = self._tasks.spawn(self._make_shared(key, value),
                                                           f"sharing {key} with local readers")
            moving.add_done_callback(lambda _: self._moving.pop(key, None))
        await asyncio.shield(moving)
        return self.values.ref_meta(key) if key in self.values else None

    async def _make_shared(self, key, value):
        if self.memory.limit is None:  # (with a limit, a copy would be memory to account for)
            view, ref_meta = await asyncio.get_running_loop().run_in_executor(
                None, self._share, value)
            if ref_meta is not None:
                if key in self.values and self.values.raw(key) is value:
                    self.values.put(key, view, ref_meta)
                return
        try:
            await self.memory.spill_now(key)
        except SpillError:  # the disk is full: it travels as bytes
            pass

    # -- ops ---------------------------------------------------------------------------------

    async def get_data(self, *, keys, host=None, session=None):
        """Values by key; to a reader on our host (``host``), shared-memory references."""
        data = {k: await self._wire_form(k, host, session) for k in keys if k in self.values}
        for serialized in data.values():
            self._count_transfer("sent", serialized, serialized.meta.get("kind"))
        missing = [k for k in keys if k not in data]
        if missing:
            return {"status": "missing-data", "keys": missing, "data": data}
        return {"data": data}

    async def update_data(self, *, data, report=True):
        """Hold these values. Over the pause mark, the reply waits until spilling (them
        too, as they are held already) made room: a client scatters no faster than we
        spill. If the disk refuses, they are dropped again and SpillError raised."""
        keys = list(data)
        for key in keys:  # taken out of the message: once spilled, nothing holds the bytes
            value, ref_meta = await self._receive(data.pop(key))
            if self._hold(key, value, shared=self.memory.limit is None and ref_meta is None,
                          ref_meta=ref_meta):
                del value
                await asyncio.get_running_loop().run_in_executor(
                    None, self._spill_overflow, key)
        self.memory.check_soon()
        try:
            await self.memory.room()
        except SpillError:
            for key in keys:
                self.values.discard(key)
            raise
        if report:
            await self.link.tell("add_keys", keys, applied=True)
        return {"keys": keys, "nbytes": self.values.nbytes_of(keys)}

    async def delete_data(self, *, keys, report=True):
        deleted = self.values.discard_all(keys)
        if report:
            await self.link.tell("remove_keys", deleted, applied=True)
        return {"keys": deleted}

    async def undelivered(self, op, request, reply):
        """Results nobody received are nobody's: drop them rather than hold them forever."""
        keys = (stored_keys(request["keys"], reply["nbytes"])
                if op == "compute" and "nbytes" in reply else ())
        if keys:
            logger.info("the caller hung up before %d results reached it: dropping them",
                        len(keys))
            await self.delete_data(keys=keys)

    def keys(self):
        return {"keys": list(self.values)}

    async def told(self):
        """Reply once the center knows of every result made here (they are told in
        batches): a client asking the center next finds them there."""
        await self.link.told()

    def identity(self):
        return {"role": "worker", "address": self.address, "name": self.name,
                "ncores": self.ncores, "center": self.center, "nkeys": len(self.values),
                "host": self.store.host if self.store else None,
                "store": self.store.info() if self.store else None,
                "memory": self.memory.info(), "local": self._local_socket()}

    def _local_socket(self):
        """Where a caller on our host may connect instead (see d3arrow.direct): our Unix
        socket's name, our process (the caller checks it is us there) and host."""
        if self.listener.local_name is None:
            return None
        return {"socket": self.listener.local_name, "pid": os.getpid(), "host": host_id()}

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

    async def compute(self, *, function, keys, args, kwargs=None, needed=None, who_has=None,
                      host=None, session=None):
        """Run ``function`` once per key; store each result under its key.

        ``args`` (and ``kwargs``) is one serialized list with an entry per key, so a batch
        of small calls costs one deserialization. Entries may hold :class:`KeyRef` s to the
        keys listed for that call in ``needed``, which are fetched first (``who_has`` may
        say where they are).

        The reply is by column, so a batch of tiny calls decodes in one go: ``nbytes``
        lists each stored result's size (None for a call that stored none); ``failed``
        maps the index of each such call to its ``error`` (with the remote traceback) or
        ``missing-data`` (with the keys no live worker holds); ``small`` maps indices to
        results that travel back with the reply: small plain values and arrays, and for a
        caller on our ``host`` a reference to a result in our store, pinned for it if it
        names its session with the store (``session``): it views the value with no
        request. ``seconds`` is the time spent running the function.
        """
        if self.memory.paused:  # over the pause mark: the caller places them elsewhere
            reply = {"status": "paused", "seconds": 0.0}
            if self.memory.error is not None:
                reply["cannot_spill"] = (f"worker {self.address} is over its memory limit "
                                         f"and cannot spill: {self.memory.error}")
            return reply
        try:
            batch = await self._read_batch(function, keys, args, kwargs, needed)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # what unpickling ran was user code too
            return {"nbytes": [None] * len(keys), "seconds": 0.0,
                    "failed": dict.fromkeys(range(len(keys)), error_reply(e))}
        inputs = batch.inputs()
        missing = (await self.fetcher.gather(inputs, who_has or {}) if inputs is not None
                   else set())
        runnable = ([i for i in range(len(keys)) if not missing.intersection(batch.needs(i))]
                    if missing else list(range(len(keys))))
        loop = asyncio.get_running_loop()
        done = []
        if self.memory.limit is None and batch.func.quick(len(runnable)):  # no thread hop
            part, seconds, runnable = self._execute(batch, runnable, loop, on_the_loop=True)
            done.append((part, seconds))
        if runnable:
            done += await self._in_threads(batch, runnable, loop)
        outcomes = {i: outcome for part, _ in done for i, outcome in part}
        seconds = sum(seconds for _, seconds in done)
        sizes, small, failed, errors = [None] * len(keys), {}, {}, 0
        for i, key in enumerate(keys):
            if i not in outcomes:
                failed[i] = {"status": "missing-data",
                             "keys": sorted(missing.intersection(batch.needs(i))),
                             "unreachable": self.fetcher.unreachable.recent()}
            elif outcomes[i][0] == "error":
                failed[i] = outcomes[i][1]
                errors += 1
            else:
                _, sizes[i], value = outcomes[i]
                # small results travel back too, saving the caller a round trip
                if type(value) is np.ndarray:
                    small[i] = serialize(value)
                elif value is not _NOT_SMALL:
                    small[i] = value
                elif self._on_our_host(host):
                    ref_meta = self.values.ref_meta(key)
                    if ref_meta is not None and ref_meta.get("socket") == self.store.socket_name:
                        small[i] = self._reference(ref_meta, session)
        self.counters.add_each(tasks=len(outcomes) - errors, tasks_failed=errors,
                               compute_seconds=seconds)
        self.memory.check_soon()
        # the caller learns where they are from this reply; the center within a few ms
        self.link.tell_soon(stored_keys(keys, sizes))
        reply = {"nbytes": sizes, "seconds": seconds}
        if small:
            reply["small"] = small
        if failed:
            reply["failed"] = failed
        return reply

    async def _read_batch(self, function, keys, args, kwargs, needed):
        """The calls of a compute request, read once (unpickling them may raise)."""
        func = (self.functions.load(function) if function.nbytes < LARGE_BYTES
                else Function(await self._load(function)))
        if args.meta.get("kind") == "keys" and kwargs is None:  # f(x) over held values
            return _Batch(func, keys, sole_keys(args), None, None, sole=True)
        calls = await self._load(args)
        call_kwargs = await self._load(kwargs) if kwargs is not None else [None] * len(keys)
        if needed is None and args.meta.get("kind") == "keys":  # (and kwargs: they name
            needed = [(ref.key,) for (ref,) in calls]  # nothing else, or it would say)
        return _Batch(func, keys, calls, call_kwargs, needed or None)

    async def _in_threads(self, batch, runnable, loop):
        """Run the calls at ``runnable`` in the compute threads: ``[(part, seconds)]``.
        One trip to the thread pool per core, not per call: small calls stay cheap."""
        chunks = [runnable[i::self.ncores] for i in range(min(self.ncores, len(runnable)))]
        run = lambda chunk: loop.run_in_executor(  # noqa: E731
            self.executor, self._execute, batch, chunk, loop)
        self._calls_running += len(runnable)
        try:
            if len(chunks) == 1:
                return [(await run(chunks[0]))[:2]]
            return [d[:2] for d in await asyncio.gather(*map(run, chunks))]
        finally:
            self._calls_running -= len(runnable)

    def _execute(self, batch, indices, loop, *, on_the_loop=False):
        """Run the calls at ``indices`` in this thread, storing each result under its key
        as it is made: ``([(i, outcome)], seconds, indices not run)``.

        With a memory limit, a result that takes the worker over its pause mark holds the
        rest of the batch back until spilling made room (each result is spillable as soon
        as it is stored); if the disk refuses, the rest fail with that error.
        ``on_the_loop``: on the event loop, stopping at the first call that was slow or
        made a blocking d3arrow call (that one is run again); the rest are left.
        """
        # on the loop, the calls (and our bookkeeping between them, which runs in compute
        # threads as well) run as in a compute thread: see on_loop
        with on_loop() if on_the_loop else _IN_A_THREAD:
            return self._run_each(batch, indices, loop, on_the_loop)

    def _run_each(self, batch, indices, loop, on_the_loop):
        start = time.perf_counter()
        values = self.values
        substitute = lambda ref: values[ref.key]  # noqa: E731
        func, calls, call_kwargs, needed, keys, sole = (
            batch.func, batch.calls, batch.kwargs, batch.needed, batch.keys, batch.sole)
        outcomes = []
        inputs = values.all_at_once([calls[i] for i in indices]) if sole else None
        for position, i in enumerate(indices):
            began = time.perf_counter()
            try:
                if sole:  # over a value we hold: its key is the call
                    value = func.func(values[calls[i]] if inputs is None else inputs[position])
                else:
                    args, kwargs = calls[i], call_kwargs[i] or {}
                    if needed and needed[i]:  # (else it names no value: nothing to put in)
                        args = map_leaves(args, KeyRef, substitute)
                        if kwargs:
                            kwargs = map_leaves(kwargs, KeyRef, substitute)
                    value = func.func(*args, **kwargs)
            except MustLeaveLoop:  # a client inside the call: it needs our loop free
                func.needs_thread = True
                return outcomes, time.perf_counter() - start, indices[position:]
            except BaseException as e:  # SystemExit too: an error of this call, not ours
                func.record(time.perf_counter() - began, on_loop=on_the_loop)
                outcomes.append((i, ("error", error_reply(e))))
                continue
            try:
                if self._hold(keys[i], value, shared=self.memory.limit is None):
                    self._spill_overflow(keys[i])
                nbytes = self.values.nbytes(keys[i])
                outcomes.append((i, ("OK", nbytes, _small(value, nbytes))))
                del value  # spilling it must be able to free it
                self.memory.room_from_thread(loop)
            except BaseException as e:  # a full disk (SpillError)
                outcomes.append((i, ("error", error_reply(e))))
            # storing it counts too
            quick = func.record(time.perf_counter() - began, on_loop=on_the_loop)
            if on_the_loop and not quick:  # the rest go to a compute thread
                return outcomes, time.perf_counter() - start, indices[position + 1:]
        return outcomes, time.perf_counter() - start, []

    async def _load(self, serialized):
        """Deserialize; large values in a thread, so the loop keeps serving meanwhile."""
        if serialized.nbytes < LARGE_BYTES or serialized.meta.get("kind") in ("tensor", "shm"):
            return load(serialized)
        return await asyncio.get_running_loop().run_in_executor(None, load, serialized)


class _Batch:
    """The calls of one compute request: ``calls[i]`` are call ``i``'s arguments (naming
    held values by KeyRef, the keys of ``needed[i]``), or, for a batch over held values
    (``sole``), the key of the one value it takes."""

    __slots__ = ("func", "keys", "calls", "kwargs", "needed", "sole")

    def __init__(self, func, keys, calls, kwargs, needed, *, sole=False):
        self.func, self.keys, self.calls, self.kwargs = func, keys, calls, kwargs
        self.needed = needed  # None: no call needs any, or a batch over held values
        self.sole = sole

    def needs(self, i):
        """The keys call ``i`` needs."""
        if self.sole:
            return (self.calls[i],)
        return self.needed[i]

    def inputs(self):
        """The keys the calls need (a key as often as calls need it); None if none."""
        if self.sole:
            return self.calls
        if self.needed is None:
            return None
        return (key for keys in self.needed for key in keys)


_NOT_SMALL = object()


def stored_keys(keys, sizes):
    """The keys of a compute request whose results were stored (by its reply's sizes)."""
    return [key for key, size in zip(keys, sizes) if size is not None]


_IN_A_THREAD = contextlib.nullcontext()


def _ref_nbytes(meta):
    """Bytes of the value a shared-memory or spilled-file reference names."""
    size = meta.get("size")
    return size if type(size) is int else 0


def _small(value, nbytes):
    """``value`` if it is small enough to travel back with its compute reply (only where
    its size is known: getsizeof of a dict says nothing of the arrays inside), else
    ``_NOT_SMALL``."""
    if nbytes <= INLINE_BYTES and (is_plain(value) or type(value) is np.ndarray):
        return value
    return _NOT_SMALL


def _open_store(capacity, shared, tight=False):
    """The worker's store; without shared memory, one that only receives (or none)."""
    try:
        return SharedStore(capacity, shared=shared, tight=tight)
    except (OSError, AttributeError) as e:  # no memfd_create, no memory, no Unix sockets
        if shared:
            logger.warning("no shared-memory store (%s): co-located workers will use TCP", e)
            return _open_store(capacity, shared=False)
        logger.warning("no receive arena (%s): receiving into fresh memory", e)
        return None
