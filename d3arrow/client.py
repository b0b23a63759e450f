"""The client: scatter values to workers, gather them back, delete them, compute.

A :class:`Client` runs its coroutines on a private uvloop loop in a thread and offers
blocking methods. It remembers where each value it placed lives (:mod:`.placement`), so it
rarely needs to ask the center; when that knowledge is stale it asks the center and tries
again. Lost results are made again from their lineage (:mod:`.lineage`).

Values made by this client (scatter, Pool.map, Pool.apply) are freed on the workers when
:meth:`Client.delete` names them or when their last :class:`RemoteData` is garbage
collected, as dask frees futures.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from .addressing import normalize_address
from .calls import as_keys
from .center_link import ASK_AGAIN_SECONDS
from .cluster import LocalCluster, token_for
from .comm import CONNECT_TIMEOUT
from .core import DEFAULT_TIMEOUT, ConnectionPool, Tasks, rebuild_error, time_limit
from .direct import DirectLinks
from .errors import (CommClosedError, KilledWorkerError, MissingDataError, NotACenterError,
                     PeerUnresponsiveError, ProtocolError, RemoteError, RemoteExit,
                     WorkerPausedError)
from .eventloop import LoopThread
from .keys import KeyMaker, new_owner
from .lineage import Lineage
from .metadata import center_address, center_rpc, close_center_rpc, shown
from .placement import Placement
from .references import RemoteData, References, wait_for
from .security import TOKEN_ENV, Security
from .serialize import Serialized, serialize, serialize_args, serialize_keys
from .store import (SharedDataGone, has_session, host_id, load, note_store_of, release_pin,
                    session_token)
from .transfer import get_data

logger = logging.getLogger(__name__)


class Client:
    """Scatter, gather and delete values on a d3arrow cluster.

    Parameters
    ----------
    address : str or (str, int), optional
        The center, ``'host:port'``. Without one, a :class:`LocalCluster` is started, owned
        by this client and stopped by :meth:`close`.
    timeout : float, default 30
        Seconds to wait for control replies (not for computations).
    shm : bool, default True
        Read values held by workers on this host as views of their shared memory (and, with
        no address, give the LocalCluster's workers a shared store).
    auth_token : str or False, optional
        The cluster's token (default ``$D3ARROW_AUTH_TOKEN``, else the token of a
        LocalCluster this process started at that address): needed where the servers
        were started with one. ``False``: connect without one.
    tls_cert, tls_key, tls_ca : str, optional
        PEM files to connect over TLS: ``tls_ca`` verifies the servers, ``tls_cert`` and
        ``tls_key`` are this client's certificate where the servers require one.
    allowed_failures : int, default 2
        A call in hand each time a worker died is tried again on another worker at most
        this many times, then given up (``KilledWorkerError``), as dask's
        ``allowed-failures``: a call that kills its process cannot take the cluster down.
    **cluster_kwargs
        Passed to :class:`LocalCluster` when no address is given.
    """

    def __init__(self, address=None, *, timeout=DEFAULT_TIMEOUT, shm=True, auth_token=None,
                 tls_cert=None, tls_key=None, tls_ca=None, allowed_failures=2,
                 **cluster_kwargs):
        self.cluster = None
        self.host = host_id() if shm else None
        if address is None:
            self.cluster = LocalCluster(shm=shm, auth_token=auth_token, tls_cert=tls_cert,
                                        tls_key=tls_key, tls_ca=tls_ca, **cluster_kwargs)
            address = self.cluster.center_address
        elif cluster_kwargs:
            raise TypeError(f"unexpected arguments {sorted(cluster_kwargs)} with an address")
        self.center = center_address(address)  # 'host:port', or a Redis URL
        self.shown_center = shown(self.center)  # for messages: no password
        if auth_token is None and not os.environ.get(TOKEN_ENV):
            auth_token = token_for(self.center)  # a private LocalCluster of this process
        security = Security.from_options(auth_token or None, tls_cert, tls_key, tls_ca)
        if auth_token is False:  # explicitly none, whatever the environment says
            security = dataclasses.replace(security, token=None)
        self.timeout = timeout
        self.owner = new_owner()  # our keys start with it: see d3arrow.keys
        self.keys = KeyMaker(self.owner)
        self._names = {}  # name a user gave -> our key for it
        self._deaths = collections.defaultdict(list)  # key -> workers that died sending it
        if type(allowed_failures) is not int or allowed_failures < 0:
            raise ValueError(f"allowed_failures must be an integer >= 0, not "
                             f"{allowed_failures!r}")
        self.allowed_failures = allowed_failures
        self.placement = Placement()
        self.pool = ConnectionPool(  # a worker that failed us is left out for a while
            security=security, connect_timeout=min(timeout or CONNECT_TIMEOUT, CONNECT_TIMEOUT),
            on_failure=self._failed)
        self.direct = DirectLinks(  # calls from the caller's thread (see d3arrow.direct)
            security, connect_timeout=min(timeout or CONNECT_TIMEOUT, CONNECT_TIMEOUT),
            host=host_id())
        self.ncores = {}
        self.lineage = Lineage(self)
        self._inline = {}  # key -> small result that came back with its compute (or a
        # reference to a co-located worker's memory, pinned for us)
        self._inline_lock = threading.Lock()
        self._tasks = Tasks()  # heartbeats, the watch on busy workers
        self._watching = None
        self._round_robin = itertools.count()
        self._results_from = {}  # worker -> when it last gave us results (time.monotonic())
        self._loop = LoopThread()
        self.refs = References(self._loop.call_soon, self._delete)
        self.closed = False
        self.closing = False  # close() has begun: a connection failing is ours, not a worker's
        try:
            self.sync(self._check_center)
        except BaseException:
            self.close(free=False)  # nothing of ours is out there to free
            raise

    # -- running coroutines --------------------------------------------------------------------

    def sync(self, coro_function, *args, timeout=None, what=None, started=None, **kwargs):
        """Run ``coro_function(*args, **kwargs)`` on the client's loop and wait for it.

        ``timeout`` bounds it there (the coroutine is cancelled, TimeoutError raised, naming
        ``what`` was not done: by default the coroutine's name), counted from ``started``
        (``time.monotonic()``) if given.
        """
        if self.closed:
            raise RuntimeError("this client is closed")
        coro = coro_function(*args, **kwargs)
        if timeout is not None:
            left = timeout if started is None else max(
                0.0, timeout - (time.monotonic() - started))
            coro = _limited(coro, left, what or coro_function.__name__.lstrip("_"), timeout)
        try:
            return self._loop.run(coro)
        except RemoteExit as e:
            raise e.exc  # its __cause__ is the remote traceback
        except (CommClosedError, asyncio.CancelledError, concurrent.futures.CancelledError) as e:
            if self.closing:  # closed from another thread meanwhile: its connections cut,
                # or what still ran on its loop cancelled
                raise RuntimeError("this client was closed while it ran this") from e
            raise

    def submit(self, coro_function, *args, **kwargs):
        if self.closed:
            raise RuntimeError("this client is closed")
        return self._loop.submit(coro_function(*args, **kwargs))

    def spawn(self, coro, what):
        """Run ``coro`` on the client's loop as a task the client owns (cancelled on close)."""
        return self._tasks.spawn(coro, what)

    def _failed(self, address):
        if address != self.center:
            self.placement.failed(address)

    def _rpc(self, address, *, timeout=None):
        """Ops of a worker, or of the center (a d3arrow center or Redis: see metadata)."""
        return center_rpc(self.pool, address, timeout=timeout or self.timeout)

    async def _check_center(self):
        """Fail at once, naming what answered, when the address is not a d3arrow center."""
        try:
            reply = await self._rpc(self.center).identity()
        except ProtocolError as e:
            raise NotACenterError(f"{self.shown_center} is not a d3arrow center: {e}") from None
        except PeerUnresponsiveError:
            raise NotACenterError(
                f"{self.shown_center} accepted a connection but did not answer within "
                f"{self.timeout:g} s: it is not a d3arrow center (or it is hung)") from None
        except (RemoteError, ValueError) as e:
            raise NotACenterError(f"{self.shown_center} is not a d3arrow center: it answered "
                                  f"{e}") from None
        role = reply.get("role")
        if role != "center":
            raise NotACenterError(f"{self.shown_center} is a d3arrow {role or 'server'}, not a center: "
                                  f"give the address its workers registered with")
        interval = (await self._rpc(self.center).register_client(client=self.owner))[
            "heartbeat_interval"]
        self._tasks.spawn(self._heartbeat(interval), "heartbeats to the center")

    async def _heartbeat(self, interval):
        """Tell the center we are alive: our values are freed once we stop (killed, or gone
        without closing). A center that forgot us (it restarted) hears of us again."""
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await self._rpc(self.center).client_heartbeat(client=self.owner)
                if reply["status"] == "unknown-client":
                    await self._rpc(self.center).register_client(client=self.owner)
            except (CommClosedError, OSError) as e:
                logger.info("heartbeat to center %s failed: %s", self.shown_center, e)

    # -- metadata ------------------------------------------------------------------------------

    def who_has(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{key: [address]}`` from the center (which knows of every result we have)."""
        return self.sync(self._who_has, keys)

    async def _who_has(self, keys=None):
        await self._center_told()
        return await self.ask_who_has(keys)

    async def ask_who_has(self, keys=None):
        reply = await self._rpc(self.center).who_has(keys=None if keys is None else list(keys))
        return reply["who_has"]

    def has_what(self, workers: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{address: [key]}`` from the center (which knows of every result we have)."""
        return self.sync(self._has_what, workers)

    async def _has_what(self, workers=None):
        workers = None if workers is None else [normalize_address(w) for w in workers]
        await self._center_told()
        return (await self._rpc(self.center).has_what(workers=workers))["has_what"]

    async def _center_told(self, *, reachable_only=False):
        """Until the center knows of the results workers gave us lately: they tell it in
        batches, a few ms later (see center_link). Asked of the center next, it answers
        as of every result we have. ``reachable_only``: not of those that failed us lately
        (they may be frozen: a wait of WATCH_SECONDS * 2 for nothing)."""
        now = time.monotonic()
        recent = [a for a, at in list(self._results_from.items()) if now - at < TELL_SECONDS]
        if reachable_only:
            recent = self.placement.reachable(recent)
        replies = await asyncio.gather(*(  # a frozen worker holds nobody up for long
            self.pool.request(a, {"op": "told"}, timeout=WATCH_SECONDS * 2) for a in recent),
            return_exceptions=True)
        for address, reply in zip(recent, replies):
            if isinstance(reply, BaseException):  # gone: the center forgets its keys anyway
                logger.info("could not make sure the center knows %s's results: %s",
                            address, reply)

    def store_info(self) -> dict[str, dict | None]:
        """``{address: dict}``: each worker's shared store (capacity, used, fallbacks, ...),
        or None for a worker without one."""
        return self.sync(self._identities, "store", what="store_info")

    def memory_info(self) -> dict[str, dict]:
        """``{address: dict}``: each worker's memory: ``limit`` (bytes or None),
        ``memory`` (bytes it holds now), ``target`` and ``pause`` (fractions of the
        limit), ``spilled_bytes`` and ``spilled_count``, ``paused``, ``directory`` (where
        it spills) and ``error`` (why the last spill failed, while it still matters)."""
        return self.sync(self._identities, "memory", what="memory_info")

    def status(self) -> dict:
        """The cluster as its center sees it: ``{"center", "uptime", "workers": [...],
        "totals": {...}, "requests": {...}}``, each worker with its ``counters`` (tasks,
        bytes sent and received by TCP and shared memory, ...), ``gauges`` (memory, store,
        spilled bytes, event loop lag, ...) and ``rates`` per second. The same as
        ``d3arrow status --json`` and the center's ``/status.json``."""
        return self.sync(self._status)

    async def _status(self):
        reply = await self._rpc(self.center).status()
        reply.pop("status", None)
        return reply

    async def _identities(self, field):
        """``{address: the worker's identity reply's field}`` for every worker."""
        if not self.ncores:
            await self.refresh_workers()
        replies = await asyncio.gather(*(self._rpc(a).identity() for a in self.ncores))
        return {a: reply[field] for a, reply in zip(self.ncores, replies)}

    def sync_ncores(self) -> dict[str, int]:
        """``{address: ncores}`` of the workers registered now."""
        return self.sync(self.refresh_workers)

    async def refresh_workers(self):
        self.ncores = (await self._rpc(self.center).ncores())["ncores"]
        return self.ncores

    def choose_workers(self, workers: Iterable[str] | None = None) -> list[str]:
        """The addresses to use: the ones given (checked against the center's), or all."""
        if workers is None:
            if not self.ncores:
                raise RuntimeError(f"no workers are registered with the center {self.shown_center}")
            return list(self.ncores)
        if isinstance(workers, str) or not workers:
            raise ValueError(f"workers={workers!r}: give a list of worker addresses "
                             f"('host:port'), or None for any worker")
        chosen = [normalize_address(w) for w in workers]
        unknown = [w for w in chosen if w not in self.ncores]
        if unknown:
            raise ValueError(f"not workers of center {self.shown_center}: {unknown}; "
                             f"known: {sorted(self.ncores)}")
        return chosen

    # -- scatter / gather / delete -------------------------------------------------------------

    def scatter(self, data: Iterable | dict, *, workers: Iterable[str] | None = None,
                timeout: float | None = None) -> list[RemoteData] | dict[str, RemoteData]:
        """Send values to the workers, spread round-robin over them.

        Parameters
        ----------
        data : list or dict
            Values; a list gets new unique keys. A dict's keys are names of this client's
            own: ``gather(['x'])`` and ``delete(['x'])`` find them, another client's ``'x'``
            is another value.
        workers : list of addresses, optional
            Restrict placement to these workers.

        Returns
        -------
        list of RemoteData, or dict {name: RemoteData} for a dict
        """
        return self.sync(self._scatter, data, workers=workers, timeout=timeout)

    async def _scatter(self, data, *, workers=None):
        if not self.ncores:
            await self.refresh_workers()
        targets = self.choose_workers(workers)
        named = isinstance(data, dict)
        if named:  # names are ours alone: another client's "x" is another value
            keys = {name: self.keys.named(name) for name in data}
            items = [(keys[name], value) for name, value in data.items()]
        else:
            items = [(self.keys.new(), value) for value in data]
        serialized = [(key, serialize(value)) for key, value in items]
        while serialized:  # until every value found a live worker
            targets = self.placement.reachable(targets)
            if not targets:
                raise CommClosedError("no worker to scatter to is reachable")
            per_worker = collections.defaultdict(dict)
            for key, value in serialized:
                per_worker[targets[next(self._round_robin) % len(targets)]][key] = value
            replies = await asyncio.gather(*(
                self.pool.request(address, {"op": "update_data", "data": values},
                                  timeout=self.timeout)
                for address, values in per_worker.items()), return_exceptions=True)
            serialized = []
            for (address, values), reply in zip(per_worker.items(), replies):
                if isinstance(reply, CommClosedError):  # gone: try the others
                    serialized.extend(values.items())
                    continue
                if isinstance(reply, BaseException):
                    raise reply
                for key in reply["keys"]:
                    self.placement.placed(key, address, reply["nbytes"].get(key))
        remote = [RemoteData(key, self, owned=True) for key, _ in items]
        if named:
            self._names.update(keys)
            return dict(zip(data, remote))
        return remote

    def gather(self, items: Iterable[RemoteData | str], *,
               timeout: float | None = None) -> list[Any]:
        """Fetch values from the workers.

        Parameters
        ----------
        items : list of RemoteData or keys

        Returns
        -------
        list of values, in order

        Raises
        ------
        MissingDataError
            Some keys are held by no live worker; the error names them.
        """
        if isinstance(items, (str, RemoteData)):
            raise TypeError(f"gather takes a list of RemoteData or keys, not one "
                            f"{type(items).__name__}: gather([{items!r}])")
        items = list(items)
        started = time.monotonic()  # what viewing takes counts
        inline = self._inline_values(items, timeout)
        if inline is not None:
            return inline
        return self.sync(self.values_of, list(items), timeout=timeout, what="gather",
                         started=started)

    def _inline_values(self, items, timeout=None):
        """The values of finished RemoteData whose results came back with their compute,
        read in the caller's thread (no trip to the loop); None if any is not one."""
        values = []
        for item in items:
            if (type(item) is not RemoteData or item.key not in self._inline
                    or not item.exists() or item.key in self.refs.deleted):
                return None
            value = self._inline_value(item.key, timeout=timeout)
            if value is _NOT_INLINE:
                return None
            values.append(value)
        return values

    def _key_of(self, item):
        """The key a RemoteData, a name we scattered, or a key names."""
        if isinstance(item, RemoteData):
            return item.key
        return self._names.get(item, item)

    async def values_of(self, items):
        """On the loop: the values of RemoteData (waiting for pending ones), names or keys."""
        failure = await wait_for(i for i in items if isinstance(i, RemoteData))
        if failure is not None:  # a task that failed: its error is the answer
            raise failure
        keys = [self._key_of(item) for item in items]
        deleted = [k for k in keys if k in self.refs.deleted]
        if deleted:
            raise MissingDataError(deleted, reason="deleted (Client.delete / Pool.delete) "
                                                   "while this RemoteData still names it")
        # small results came back with their computation: rebuild them, fetch the rest
        values = {key: self._inline_value(key, on_loop=True) for key in keys
                  if key in self._inline}
        values = {key: value for key, value in values.items() if value is not _NOT_INLINE}
        remote = set(keys) - values.keys()

        async def attempt():  # every copy of some lost: they are made again, see Lineage
            try:
                values.update(await self._fetch(remote - values.keys()))
                return ()
            except MissingDataError as e:
                killers = [k for k in e.keys
                           if len(self._deaths.get(k, ())) > self.allowed_failures]
                if killers:  # its holders died sending it: it is taken to kill them
                    died = self._deaths[killers[0]]
                    raise KilledWorkerError.after(f"{killers[0]} (a value being sent)", died,
                                                  self.allowed_failures) from None
                return e.keys

        await self.lineage.retry(attempt)
        return [values[key] for key in keys]

    async def _fetch(self, keys):
        """{key: value} for ``keys``: known holders first, then what the center says."""
        values = {}
        unplaced = self.placement.unplaced(keys)
        if unplaced:
            self.placement.learn(await self.ask_who_has(unplaced))
        for attempt in range(2):
            plan = collections.defaultdict(list)
            for key in keys - values.keys():
                holders = self.placement.holders(key)
                if holders:  # a value whose holder died sending it travels alone
                    plan[holders[0], key if self._deaths.get(key) else None].append(key)
            replies = await asyncio.gather(*(
                self._get_data(address, ks) for (address, _), ks in plan.items()))
            for reply in replies:
                values.update(reply)
            missing = keys - values.keys()
            if not missing:
                return values
            if attempt == 0:  # our knowledge was stale, or the center's: ask it once more
                stale = [key for key in missing if self.placement.forget(key)]
                if len(stale) < len(missing):  # it knew no holder: another client's fresh
                    await asyncio.sleep(ASK_AGAIN_SECONDS)  # result, not told it yet?
                self.placement.learn(await self.ask_who_has(missing))
        raise MissingDataError(sorted(missing))

    async def _get_data(self, address, keys):
        """{key: value} for the keys ``address`` could give; views of shared memory if local."""
        async def receive(value, peer):
            return load(value, peer=peer)

        def died(address, keys):
            for key in keys:
                self._deaths[key].append(address)

        return await get_data(self.pool, address, keys, host=self.host, receive=receive,
                              timeout=self.timeout, on_death=died)

    async def _watch_workers(self):
        """Break off computations on workers the center has dropped (dead, or hung).

        A computation may rightly run for hours, so it has no timeout of its own; but once
        its worker missed its heartbeats, waiting on would wait forever.
        """
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            busy = self.pool.busy_addresses() - {self.center}
            if not busy:
                continue
            try:
                registered = (await self._rpc(self.center).ncores())["ncores"]
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("cannot check on workers with the center: %s", e)
                continue
            for address in busy - registered.keys():
                if not await self._given_up(address, registered):
                    continue
                logger.warning("worker %s was dropped by the center and does not answer: "
                               "giving up on its computations", address)
                self.pool.abort(address)  # its requests fail: it is left out from then on

    async def _given_up(self, address, registered=None):
        """Whether to give up waiting on ``address``: the center dropped it (it missed its
        heartbeats) and it does not answer. Not if the center cannot be asked."""
        if registered is None:
            try:
                registered = (await self._rpc(self.center).ncores())["ncores"]
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("cannot check on worker %s with the center: %s", address, e)
                return False
        if address in registered:
            return False
        if await self._answers(address):  # the center forgot it only for a while
            logger.info("worker %s is not registered with the center but answers: "
                        "still waiting on it", address)
            return False
        return True

    async def _answers(self, address):
        """Whether the worker at ``address`` answers a request within a watch period."""
        try:
            await self.pool.request(address, {"op": "identity"}, timeout=WATCH_SECONDS * 2)
            return True
        except OSError:  # CommClosedError, PeerUnresponsiveError: it is gone or frozen
            return False

    def delete(self, items: Iterable[RemoteData | str], *,
               timeout: float | None = None) -> None:
        """Delete values from every worker that holds them."""
        keys = [self._key_of(item) for item in items]
        for name in [n for n, k in self._names.items() if k in keys]:
            del self._names[name]
        return self.sync(self._delete, keys, timeout=timeout)

    async def _delete(self, keys, *, silence=None):
        """``silence``: how long a holder may say nothing before we leave its copies to
        the center, which frees a closed client's values (a frozen worker's included, once
        it runs again)."""
        keys = list(dict.fromkeys(keys))  # each once, in order: see References._released
        if not keys:
            return
        self.refs.mark_deleted(keys)
        self.lineage.forget(keys)
        believed = collections.defaultdict(list)  # address -> the keys we put there alone
        unsure = {}  # key -> where we put it, where that is not one worker
        for key, placed in zip(keys, self.placement.drop_all(keys)):
            if len(placed) == 1:
                believed[placed[0]].append(key)
            else:
                unsure[key] = placed
        holders = {a: dict.fromkeys(ks) for a, ks in believed.items()}  # address -> keys
        for key, placed in unsure.items():  # and the copies the center knows of
            for address in placed:
                holders.setdefault(address, {})[key] = None
        if not all(unsure.values()):  # some we know no holder of (a free cut short by
            # close, say): the center must know of all ours (a holder that failed us would
            # not be asked to delete anyway)
            await self._center_told(reachable_only=True)
        try:  # (of the keys we placed, only those held elsewhere too come back)
            who_has = (await self._rpc(self.center).who_has(keys=list(unsure), believed=believed)
                       )["who_has"]
        except (CommClosedError, OSError) as e:  # what we placed ourselves we know anyway
            logger.warning("center %s unreachable (%s): deleting %d values where this client "
                           "placed them", self.shown_center, e, len(keys))
            who_has = {}
        for key, addresses in who_has.items():
            for address in addresses:
                holders.setdefault(address, {})[key] = None
        self._drop_inline(keys)
        addresses = self.placement.reachable(holders)  # the unreachable took theirs along
        replies = await asyncio.gather(*(
            self._rpc(address, timeout=silence).delete_data(keys=list(holders[address]))
            for address in addresses), return_exceptions=True)
        for address, reply in zip(addresses, replies):
            if isinstance(reply, BaseException):
                logger.warning("could not delete %d values on %s: %s", len(holders[address]),
                               address, reply)

    # -- computing -----------------------------------------------------------------------------

    async def compute(self, address, function, calls, *, on_sent=None, placed=False):
        """Run ``function`` (Serialized) on ``address`` once per :class:`Call`.

        Returns ``(outcomes, seconds)``: per call a RemoteData or the exception to raise for
        it, and the seconds the worker spent running the function. ``on_sent()`` is called
        once the request is written. ``placed``: see :meth:`compute_request`. Raises
        CommClosedError if the worker failed us, WorkerPausedError if it took none of them
        (over its memory limit).
        """
        msg = self.compute_request(address, function, calls, placed=placed)
        if self._watching is None or self._watching.done():
            self._watching = self._tasks.spawn(self._watch_workers(), "watching busy workers")
        reply = await self.pool.request(address, msg, on_sent=on_sent)
        return self.compute_outcomes(address, function, calls, reply)

    def compute_request(self, address, function, calls, *, placed=False):
        """The message asking ``address`` to run ``function`` once per call (from any
        thread: see d3arrow.direct).

        It says where the inputs of calls over held values are, unless they were
        ``placed`` on ``address`` for their inputs: then looking each up again (a dict of
        every key we placed, mostly out of the cache by now) is wasted on all but a call
        whose holder we did not know of, and that worker asks the center.
        """
        msg = {"op": "compute", "function": function, "keys": [call.key for call in calls]}
        if self.host:  # results in a co-located store come back as references to view
            msg["host"] = self.host
            session = session_token(address)
            if session is not None:  # pinned for us: viewing them costs no round trip
                msg["session"] = session
        needs = [call.needs for call in calls]
        inputs = None  # f(x) over held values, every call: x's key per call
        if set(map(type, needs)) == {str}:  # over RemoteData (a map's): needs say it all,
            inputs = needs  # the RemoteData are not touched
            msg["args"] = serialize_keys(inputs)
        else:
            msg["args"] = serialize_args([call.args for call in calls])
            if any(call.kwargs for call in calls):
                msg["kwargs"] = serialize([call.kwargs for call in calls])
            elif msg["args"].meta["kind"] == "keys":  # over KeyRefs (a graph's)
                inputs = [call.args[0].key for call in calls]
        if inputs is not None:  # their args name what they need: their x
            if not placed:
                msg["who_has"] = self.placement.hints(address, inputs)
            return msg
        if any(needs):
            needed = [as_keys(call_needs) for call_needs in needs]
            msg["who_has"] = self.placement.hints(
                address, [key for keys in needed for key in keys])
            msg["needed"] = needed
        return msg

    def compute_outcomes(self, address, function, calls, reply):
        """What a compute reply says, per call (see :meth:`compute`); what it placed is
        noted. From any thread: each note is one atomic update."""
        if reply.get("status") == "paused":
            raise WorkerPausedError(f"worker {address} is paused: over its memory limit",
                                    reply.get("cannot_spill"))
        outcomes = []
        self._results_from[address] = time.monotonic()
        recipe = None
        small = reply.get("small", {})
        for i, (call, nbytes) in enumerate(zip(calls, reply["nbytes"])):
            if nbytes is None:
                outcomes.append(self._failure(reply["failed"][i]))
                continue
            if recipe is None:
                recipe = self.lineage.record(function)
            self.placement.placed(call.key, address, nbytes)
            if call.key in self._inline:  # made again: the old one goes
                self._drop_inline([call.key])
            if i in small:  # rebuilt when asked for: most are never read here
                value = self._inline[call.key] = small[i]
                if type(value) is Serialized and value.meta.get("kind") == "shm":
                    note_store_of(address, value.meta["socket"])  # a place to view
            outcomes.append(RemoteData(call.key, self, owned=True, recipe=recipe(call)))
        return outcomes, reply["seconds"]

    def _failure(self, result):
        """What a call that stored no result raises: its error, or MissingDataError if an
        input was gone (the peers the worker found gone are left out from now on)."""
        if result["status"] == "missing-data":
            for peer in result.get("unreachable", ()):
                self.placement.failed(peer)
            return MissingDataError(result["keys"])
        return rebuild_error(result)

    def _inline_value(self, key, *, on_loop=False, timeout=None):
        """A result that came back with its compute; _NOT_INLINE if there is none, or it
        is a reference that cannot be viewed (then it is fetched as any other).

        A small serialized array is rebuilt once and kept. A reference to a co-located
        worker's memory gives a new view each time, as a fetch would: the first one takes
        the pin the worker made for us, later ones pin for themselves. Viewing may wait on
        the owner (opening our session with its store, or pinning) up to ``timeout``, so
        it happens outside the lock the loop takes for every compute reply; on the loop
        only a pinned reference to a store we have a session with is viewed (no wait)."""
        with self._inline_lock:
            held = self._inline.get(key, _NOT_INLINE)
            if type(held) is not Serialized:
                return held
            meta = held.meta
            if meta.get("kind") != "shm":
                value = self._inline[key] = _rebuilt(held)
                return value
            if on_loop and ("pin" not in meta or not has_session(meta["socket"])):
                return _NOT_INLINE
            left = held
            if "pin" in meta:  # this view takes that pin: no other may (one pin, one view)
                left = self._inline[key] = Serialized(
                    {k: v for k, v in meta.items() if k not in ("pin", "token")}, [])
        try:
            return load(held, timeout=timeout)
        except SharedDataGone:
            with self._inline_lock:
                if self._inline.get(key) is left:  # (not a result made again meanwhile)
                    del self._inline[key]
            return _NOT_INLINE

    def _drop_inline(self, keys):
        """Forget what came back with these keys' computes; a reference never viewed is
        unpinned (a view releases its pin when collected)."""
        with self._inline_lock:
            held = [self._inline.pop(key, None) for key in keys]
        for value in held:
            if type(value) is Serialized and "pin" in value.meta:
                release_pin(value.meta)

    # -- published values: beyond the life of their client ------------------------------------

    def publish(self, name: str, item: RemoteData | str, *,
                timeout: float | None = None) -> None:
        """Keep a value beyond this client's life, findable by ``name`` from any client."""
        return self.sync(self._publish, name, self._key_of(item), timeout=timeout)

    async def _publish(self, name, key):
        await self._center_told()  # who reads the name finds the value's holders
        await self._rpc(self.center).publish(name=name, key=key)
        self.refs.kept.add(key)

    def published(self, name: str, *, timeout: float | None = None) -> RemoteData:
        """The RemoteData published as ``name`` (KeyError if none is)."""
        return self.sync(self._published_as, name, timeout=timeout)

    async def _published_as(self, name):
        reply = await self._rpc(self.center).published(name=name)
        if reply["status"] == "unknown-name":
            raise KeyError(f"nothing is published as {name!r}")
        return RemoteData(reply["key"], self)

    def unpublish(self, name: str, *, timeout: float | None = None) -> None:
        """Stop keeping the value published as ``name``: it is freed unless a live client
        still holds it."""
        return self.sync(self._unpublish, name, timeout=timeout)

    async def _unpublish(self, name):
        reply = await self._rpc(self.center).unpublish(name=name)
        if reply["status"] == "unknown-name":
            raise KeyError(f"nothing is published as {name!r}")
        self.refs.kept.discard(reply["key"])

    def where(self, key: str) -> set[str]:
        """Addresses this client believes hold ``key`` (may be stale)."""
        return set(self.placement.holders(key))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self, *, free: bool = True) -> None:
        """Free the values this client made, close connections, stop an owned cluster."""
        if self.closed:
            return
        self.closing = True
        try:
            self._loop.run(self._close() if free else self._close_connections(),
                           timeout=self.timeout)
        except Exception as e:
            logger.warning("could not free this client's values on close: %s", e)
        finally:
            self.closed = True
            self.direct.close()
            self._loop.stop()
            if self.cluster is not None:
                self.cluster.close()

    async def _close_connections(self):
        self.pool.close()
        await close_center_rpc(self.center)

    async def _close(self):
        to_free = await self.refs.close()
        await self._tasks.close()
        try:
            if self.cluster is None:  # an owned cluster is about to go away with its values
                await self._delete(to_free, silence=WATCH_SECONDS * 2)
                try:  # the center frees what we could not find: once it knows of it all
                    await self._center_told(reachable_only=True)  # (or hears of it late)
                    await self._rpc(self.center).unregister_client(client=self.owner)
                except (CommClosedError, OSError) as e:
                    logger.info("could not tell center %s this client closed: %s",
                                self.shown_center, e)
        finally:
            self.pool.close()
            await close_center_rpc(self.center)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Client center={self.shown_center} workers={len(self.ncores)}>"


_NOT_INLINE = object()


def _rebuilt(inline):
    """A result as it came back with its compute: plain, serialized (a small array), or a
    reference to a co-located worker's memory (then a view of it)."""
    return load(inline) if type(inline) is Serialized else inline


async def _limited(coro, timeout, what, stated):
    async with time_limit(timeout, what, stated=stated):
        return await coro


# results a worker gave us this recently may not have reached the center yet (in practice
# they do within its UPDATE_BATCH_SECONDS; this covers a worker whose loop was held up)
TELL_SECONDS = 10.0
WATCH_SECONDS = 1.0  # how often computations in flight are checked against the center
