"""The client: scatter values to workers, gather them back, delete them; RemoteData.

A :class:`Client` runs its coroutines on a private uvloop loop in a thread and offers
blocking methods. It remembers where each value it placed lives, so it rarely needs to
ask the center; when that knowledge is stale it asks the center and tries again.

Values made by this client (scatter, Pool.map, Pool.apply) are freed on the workers when
:meth:`Client.delete` names them or when their last :class:`RemoteData` is garbage
collected, as dask frees futures.
"""

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import weakref

from .addressing import normalize_address
from .cluster import LocalCluster, token_for
from .comm import CONNECT_TIMEOUT
from .core import (DEFAULT_TIMEOUT, ConnectionPool, RecentFailures, log_failure,
                   rebuild_error, time_limit)
from .errors import (CommClosedError, KilledWorkerError, LostDataError, MissingDataError,
                     NotACenterError, PeerUnresponsiveError, ProtocolError, RemoteError,
                     RemoteExit)
from .eventloop import LoopThread
from .keys import KeyMaker, new_owner
from .security import TOKEN_ENV, Security
from .serialize import serialize
from .store import host_id, load
from .task import KeyRef, find_leaves, map_leaves
from .transfer import get_data

logger = logging.getLogger(__name__)


class RemoteData:
    """A value held by the workers, named by ``key``; ``get()`` fetches it.

    Attributes
    ----------
    key : str
    center : str
        Address of the center that knows where the value lives.
    """

    __slots__ = ("key", "_client", "_owned", "_recipe", "__weakref__")

    def __init__(self, key, client, *, owned=False, recipe=None):
        self.key = key
        self._client = client
        self._owned = owned
        self._recipe = recipe  # how it was made (Pool results): kept alive with it
        if owned:
            client._incref(key)

    @property
    def center(self):
        return self._client.center

    def get(self, *, timeout=None):
        """Fetch the value from a worker that holds it.

        A Pool result whose every copy was lost with its workers is computed again from
        its lineage first.

        Raises
        ------
        LostDataError
            Every copy was lost and the value cannot be computed again (it was scattered,
            or an input it needs was).
        MissingDataError
            No live worker holds the key.
        TimeoutError
            Not done within ``timeout`` seconds.
        """
        return self._client.gather([self], timeout=timeout)[0]

    def __repr__(self):
        return f"RemoteData<center={self.center}, key={self.key}>"

    def __eq__(self, other):
        return isinstance(other, RemoteData) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    def __reduce__(self):
        raise TypeError("a RemoteData cannot be pickled: it is bound to its client. In the "
                        "arguments of Pool.map / Pool.apply it is replaced by its value (also "
                        "inside lists, tuples, sets and dict values), but not as a dict key "
                        "or inside other objects: send its .key there")

    def __del__(self):
        if self._owned:
            try:
                self._client._decref(self.key)
            except Exception:  # interpreter shutdown: the cluster goes away anyway
                pass


class Recipe:
    """How a Pool result was made, to make it again when every copy of it is lost.

    ``args`` / ``kwargs`` name inputs by :class:`KeyRef`; ``inputs`` gives each input key's
    own Recipe (None for a scattered value, which cannot be remade). Recipes keep recipes
    alive, never data: a dropped intermediate result is freed on the workers, and made
    again only if a value that needs it must be.
    """

    __slots__ = ("function", "args", "kwargs", "inputs", "__weakref__")

    def __init__(self, function, args, kwargs, inputs):
        self.function, self.args, self.kwargs, self.inputs = function, args, kwargs, inputs


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
        self.center = normalize_address(address)
        if auth_token is None and not os.environ.get(TOKEN_ENV):
            auth_token = token_for(self.center)  # a private LocalCluster of this process
        security = Security.from_options(auth_token or None, tls_cert, tls_key, tls_ca)
        if auth_token is False:  # explicitly none, whatever the environment says
            security = dataclasses.replace(security, token=None)
        self.timeout = timeout
        self.owner = new_owner()  # our keys start with it: see d3arrow.keys
        self.keys = KeyMaker(self.owner)
        self._names = {}  # name a user gave -> our key for it
        self._kept = set()  # keys published: not freed with their RemoteData or on close
        self._deaths = collections.defaultdict(list)  # key -> workers that died sending it
        self._heartbeat_task = None
        if type(allowed_failures) is not int or allowed_failures < 0:
            raise ValueError(f"allowed_failures must be an integer >= 0, not "
                             f"{allowed_failures!r}")
        self.allowed_failures = allowed_failures
        self.pool = ConnectionPool(security=security,
                                   connect_timeout=min(timeout or CONNECT_TIMEOUT, CONNECT_TIMEOUT))
        self.ncores = {}
        self._where = {}  # key -> {address}, what this client knows of placement
        self._nbytes = {}
        self._inline = {}  # key -> small result that came back with its compute
        self._refcount = collections.Counter()
        self._recipes = weakref.WeakValueDictionary()  # key -> Recipe of results alive
        self._unreachable = RecentFailures()
        self._deleted = set()  # keys deleted on purpose while RemoteData still name them
        self._watch_task = None
        self._dropped = collections.deque()  # keys whose RemoteData went, for the loop
        self._drops_scheduled = False
        self._released = set()  # keys no RemoteData names any more, to free on the workers
        self._release_task = None
        self._round_robin = itertools.count()
        self._loop = LoopThread()
        self.closed = False
        try:
            self.sync(self._check_center)
        except BaseException:
            self.close(free=False)  # nothing of ours is out there to free
            raise

    # -- running coroutines --------------------------------------------------------------------

    def sync(self, coro_function, *args, timeout=None, **kwargs):
        """Run ``coro_function(*args, **kwargs)`` on the client's loop and wait for it.

        ``timeout`` bounds it there (the coroutine is cancelled, TimeoutError raised).
        """
        if self.closed:
            raise RuntimeError("this client is closed")
        what = coro_function.__name__.lstrip("_")
        try:
            return self._loop.run(_limited(coro_function(*args, **kwargs), timeout, what))
        except RemoteExit as e:
            raise e.exc  # its __cause__ is the remote traceback

    def submit(self, coro_function, *args, **kwargs):
        if self.closed:
            raise RuntimeError("this client is closed")
        return self._loop.submit(coro_function(*args, **kwargs))

    def _rpc(self, address):
        return self.pool.rpc(address, timeout=self.timeout)

    async def _check_center(self):
        """Fail at once, naming what answered, when the address is not a d3arrow center."""
        try:
            reply = await self._rpc(self.center).identity()
        except ProtocolError as e:
            raise NotACenterError(f"{self.center} is not a d3arrow center: {e}") from None
        except PeerUnresponsiveError:
            raise NotACenterError(
                f"{self.center} accepted a connection but did not answer within "
                f"{self.timeout:g} s: it is not a d3arrow center (or it is hung)") from None
        except (RemoteError, ValueError) as e:
            raise NotACenterError(f"{self.center} is not a d3arrow center: it answered "
                                  f"{e}") from None
        role = reply.get("role")
        if role != "center":
            raise NotACenterError(f"{self.center} is a d3arrow {role or 'server'}, not a center: "
                                  f"give the address its workers registered with")
        interval = (await self._rpc(self.center).register_client(client=self.owner))[
            "heartbeat_interval"]
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat(interval))

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
                logger.info("heartbeat to center %s failed: %s", self.center, e)

    # -- metadata ------------------------------------------------------------------------------

    def who_has(self, keys=None):
        """``{key: [address]}`` from the center."""
        return self.sync(self._who_has, keys)

    async def _who_has(self, keys=None):
        reply = await self._rpc(self.center).who_has(keys=None if keys is None else list(keys))
        return reply["who_has"]

    def has_what(self, workers=None):
        """``{address: [key]}`` from the center."""
        return self.sync(self._has_what, workers)

    async def _has_what(self, workers=None):
        workers = None if workers is None else [normalize_address(w) for w in workers]
        return (await self._rpc(self.center).has_what(workers=workers))["has_what"]

    def store_info(self):
        """``{address: dict}``: each worker's shared store (capacity, used, fallbacks, ...),
        or None for a worker without one."""
        return self.sync(self._store_info)

    async def _store_info(self):
        if not self.ncores:
            await self._sync_ncores()
        replies = await asyncio.gather(*(self._rpc(a).identity() for a in self.ncores))
        return {a: reply["store"] for a, reply in zip(self.ncores, replies)}

    def sync_ncores(self):
        return self.sync(self._sync_ncores)

    async def _sync_ncores(self):
        self.ncores = (await self._rpc(self.center).ncores())["ncores"]
        return self.ncores

    def _workers(self, workers=None):
        """The addresses to use: the ones given (checked against the center's), or all."""
        if workers is None:
            if not self.ncores:
                raise RuntimeError(f"no workers are registered with the center {self.center}")
            return list(self.ncores)
        if isinstance(workers, str) or not workers:
            raise ValueError(f"workers={workers!r}: give a list of worker addresses "
                             f"('host:port'), or None for any worker")
        chosen = [normalize_address(w) for w in workers]
        unknown = [w for w in chosen if w not in self.ncores]
        if unknown:
            raise ValueError(f"not workers of center {self.center}: {unknown}; "
                             f"known: {sorted(self.ncores)}")
        return chosen

    # -- scatter / gather / delete -------------------------------------------------------------

    def scatter(self, data, *, workers=None, timeout=None):
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
            await self._sync_ncores()
        targets = self._workers(workers)
        named = isinstance(data, dict)
        if named:  # names are ours alone: another client's "x" is another value
            keys = {name: self.keys.named(name) for name in data}
            items = [(keys[name], value) for name, value in data.items()]
        else:
            items = [(self.keys.new(), value) for value in data]
        serialized = [(key, serialize(value)) for key, value in items]
        while serialized:  # until every value found a live worker
            targets = self._reachable(targets)
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
                if isinstance(reply, CommClosedError):
                    self._failed(address)
                    serialized.extend(values.items())
                    continue
                if isinstance(reply, BaseException):
                    raise reply
                for key in reply["keys"]:
                    self._where[key] = {address}
                self._nbytes.update(reply["nbytes"])
        remote = [RemoteData(key, self, owned=True) for key, _ in items]
        if named:
            self._names.update(keys)
            return dict(zip(data, remote))
        return remote

    def gather(self, items, *, timeout=None):
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
        return self.sync(self._gather, list(items), timeout=timeout)

    def _key_of(self, item):
        """The key a RemoteData, a name we scattered, or a key names."""
        if isinstance(item, RemoteData):
            return item.key
        return self._names.get(item, item)

    async def _gather(self, items):
        keys = [self._key_of(item) for item in items]
        deleted = [k for k in keys if k in self._deleted]
        if deleted:
            raise MissingDataError(deleted, reason="deleted (Client.delete / Pool.delete) "
                                                   "while this RemoteData still names it")
        # small results came back with their computation: rebuild them, fetch the rest
        values = {key: self._inline[key] for key in keys if key in self._inline}
        remote = set(keys) - values.keys()
        remade = False
        while remote - values.keys():
            deaths = sum(len(self._deaths.get(k, ())) for k in remote)
            try:
                values.update(await self._fetch(remote - values.keys()))
            except MissingDataError as e:  # every copy lost: make them again
                killers = [k for k in e.keys
                           if len(self._deaths.get(k, ())) > self.allowed_failures]
                if killers:
                    died = self._deaths[killers[0]]
                    raise KilledWorkerError.after(f"{killers[0]} (a value being sent)", died,
                                                  self.allowed_failures) from None
                # once, or again while holders die sending (bounded by allowed_failures)
                if remade and sum(len(self._deaths.get(k, ())) for k in remote) == deaths:
                    raise
                remade = True
                await self._remake(e.keys)
        return [values[key] for key in keys]

    async def _fetch(self, keys):
        """{key: value} for ``keys``: known holders first, then what the center says."""
        values = {}
        unplaced = {k for k in keys if not self._where.get(k)}
        if unplaced:
            self._learn(await self._who_has(unplaced))
        for attempt in range(2):
            plan = collections.defaultdict(list)
            for key in keys - values.keys():
                holders = self._reachable(self._where.get(key, ()))
                if holders:  # a value whose holder died sending it travels alone
                    plan[holders[0], key if self._deaths.get(key) else None].append(key)
            replies = await asyncio.gather(*(
                self._get_data(address, ks) for (address, _), ks in plan.items()))
            for reply in replies:
                values.update(reply)
            missing = keys - values.keys()
            if not missing:
                return values
            if attempt == 0:  # our knowledge was stale: ask the center once
                for key in missing:
                    self._where.pop(key, None)
                self._learn(await self._who_has(missing))
        raise MissingDataError(sorted(missing))

    async def _get_data(self, address, keys):
        """{key: value} for the keys ``address`` could give; views of shared memory if local."""
        async def receive(value, peer):
            return load(value, peer=peer)

        def died(address, keys):
            for key in keys:
                self._deaths[key].append(address)

        return await get_data(self.pool, address, keys, host=self.host, receive=receive,
                              timeout=self.timeout, on_failure=self._failed, on_death=died)

    def _failed(self, address):
        """``address`` could not be reached: leave it out until the center drops it."""
        self._unreachable.add(address)
        for holders in self._where.values():
            holders.discard(address)

    def _reachable(self, addresses):
        """``addresses`` less those that failed us lately (they may have died)."""
        return self._unreachable.without(addresses)

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
                if await self._answers(address):  # the center forgot it only for a while
                    logger.info("worker %s is not registered with the center but answers: "
                                "still waiting on it", address)
                    continue
                logger.warning("worker %s was dropped by the center and does not answer: "
                               "giving up on its computations", address)
                self._failed(address)
                self.pool.abort(address)

    async def _answers(self, address):
        """Whether the worker at ``address`` answers a request within a watch period."""
        try:
            await self.pool.request(address, {"op": "identity"}, timeout=WATCH_SECONDS * 2)
            return True
        except (CommClosedError, OSError):
            return False

    # -- lineage: making lost results again ----------------------------------------------------

    async def _remake(self, keys):
        """Compute again, from their recipes, those of ``keys`` no reachable worker holds.

        Lost inputs are made again first (recursively); those no RemoteData holds any
        more are freed once their dependents are done. Raises LostDataError for a lost
        value of ours without a recipe (scattered), MissingDataError for a key we never
        made.
        """
        unknown = [k for k in keys if k in self._deleted
                   or (k not in self._refcount and k not in self._recipes)]
        if unknown:
            raise MissingDataError(unknown)
        await self._remake_into({k: self._recipes.get(k) for k in keys}, keep=[])

    async def _remake_into(self, recipes, keep):
        """Have each key of ``recipes`` ({key: Recipe or None}) on a live worker.

        ``keep`` collects RemoteData for every key used, so that none is freed (a dropped
        intermediate) while its dependents are computed; the caller drops them at the end.
        """
        for _ in range(REMAKE_ATTEMPTS):
            who_has = await self._who_has(list(recipes))
            self._learn(who_has)
            present = [k for k in recipes if self._reachable(who_has.get(k, ()))]
            keep.extend(RemoteData(k, self, owned=True) for k in present)
            lost = [k for k in recipes if k not in present]
            if not lost:
                return
            cannot = [k for k in lost if recipes[k] is None]
            if cannot:
                raise LostDataError(cannot)
            logger.warning("remaking %d lost value(s) from their lineage", len(lost))
            await self._remake_into(
                {k: r for key in lost for k, r in recipes[key].inputs.items()}, keep)
            if not self.ncores:
                await self._sync_ncores()
            by_function = collections.defaultdict(list)
            for key in lost:
                by_function[id(recipes[key].function)].append(key)
            again = []
            for keys in by_function.values():
                outcomes = await self._compute_somewhere(
                    recipes[keys[0]].function,
                    [(key, recipes[key].args, recipes[key].kwargs) for key in keys])
                for key, outcome in zip(keys, outcomes):
                    if type(outcome) is MissingDataError:  # an input went meanwhile
                        again.append(key)
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        keep.append(outcome)
            if not again:
                return
            recipes = {k: recipes[k] for k in again}
        raise MissingDataError(sorted(recipes))

    async def _compute_somewhere(self, function, calls):
        """Run ``calls`` on some live worker, trying the others if it is unreachable.

        Calls in hand when ``allowed_failures + 1`` workers died are given up.
        """
        candidates = self._reachable(list(self.ncores))
        died = []
        for _ in range(2):
            start = next(self._round_robin) % max(1, len(candidates))  # spread the work
            for address in candidates[start:] + candidates[:start]:
                sent = []
                try:
                    outcomes, _ = await self._compute(address, function, calls,
                                                      on_sent=lambda: sent.append(True))
                    return outcomes
                except CommClosedError:
                    self._failed(address)
                    if sent:
                        died.append(address)
                    if len(died) > self.allowed_failures:
                        raise KilledWorkerError.after(
                            f"remaking {', '.join(k for k, _, _ in calls)} from its lineage",
                            died, self.allowed_failures) from None
            await self._sync_ncores()
            candidates = self._reachable(list(self.ncores))
        raise CommClosedError("no live worker could compute the lost values again")

    def _learn(self, who_has):
        for key, addresses in who_has.items():
            if addresses:
                self._where[key] = set(addresses)

    def delete(self, items, *, timeout=None):
        """Delete values from every worker that holds them."""
        keys = [self._key_of(item) for item in items]
        for name in [n for n, k in self._names.items() if k in keys]:
            del self._names[name]
        return self.sync(self._delete, keys, timeout=timeout)

    async def _delete(self, keys):
        keys = set(keys)
        if not keys:
            return
        self._deleted.update(k for k in keys if k in self._refcount)
        for key in keys:
            self._recipes.pop(key, None)
        try:
            who_has = await self._who_has(keys)
        except (CommClosedError, OSError) as e:  # what we placed ourselves we know anyway
            logger.warning("center %s unreachable (%s): deleting %d values where this client "
                           "placed them", self.center, e, len(keys))
            who_has = {}
        holders = collections.defaultdict(set)
        for key in keys:
            for address in set(who_has.get(key, ())) | self._where.pop(key, set()):
                holders[address].add(key)
            self._nbytes.pop(key, None)
            self._inline.pop(key, None)
        addresses = self._reachable(holders)  # the unreachable took their copies along
        replies = await asyncio.gather(*(
            self._rpc(address).delete_data(keys=list(holders[address]))
            for address in addresses), return_exceptions=True)
        for address, reply in zip(addresses, replies):
            if isinstance(reply, BaseException):
                logger.warning("could not delete %d values on %s: %s", len(holders[address]),
                               address, reply)

    # -- computing -----------------------------------------------------------------------------

    async def _compute(self, address, function, calls, *, on_sent=None):
        """Run ``function`` (Serialized) on ``address`` for each ``(key, args, kwargs)``.

        Returns ``(outcomes, seconds)``: per call a RemoteData or the exception to raise for
        it, and the seconds the worker spent running the function.
        """
        hints = {}
        needed = []
        to_keyref = lambda r: KeyRef(r.key)  # noqa: E731
        for _, args, kwargs in calls:
            refs = find_leaves((args, kwargs), REFERENCES)
            needed.append([ref.key for ref in refs])
            for ref in refs:
                holders = self._reachable(self._where.get(ref.key, ()))
                if holders and address not in holders:
                    hints[ref.key] = holders
        has_refs = any(needed)
        args = [tuple(args) for _, args, _ in calls]
        kwargs = [kwargs for _, _, kwargs in calls]
        if has_refs:
            args = map_leaves(args, RemoteData, to_keyref)
        if any(kwargs):
            kwargs = map_leaves(kwargs, RemoteData, to_keyref)
        msg = {"op": "compute", "function": function, "keys": [key for key, _, _ in calls],
               "args": serialize(args)}
        if any(kwargs):
            msg["kwargs"] = serialize(kwargs)
        if has_refs:
            msg.update(needed=needed, who_has=hints)
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_workers())
        reply = await self.pool.request(address, msg, on_sent=on_sent)
        outcomes = []
        for i, result in enumerate(reply["results"]):
            if result["status"] == "OK":
                self._where[result["key"]] = {address}
                self._nbytes[result["key"]] = result["nbytes"]
                if "plain" in result:
                    self._inline[result["key"]] = result["plain"]
                elif "value" in result:
                    self._inline[result["key"]] = load(result["value"])
                recipe = self._recipes.get(result["key"])
                if recipe is None:  # made again, it keeps its recipe
                    recipe = self._recipes[result["key"]] = Recipe(
                        function, args[i], kwargs[i],
                        {k: self._recipes.get(k) for k in needed[i]})
                outcomes.append(RemoteData(result["key"], self, owned=True, recipe=recipe))
            elif result["status"] == "missing-data":
                for peer in result.get("unreachable", ()):  # the worker found them gone
                    self._failed(peer)
                outcomes.append(MissingDataError(result["keys"]))
            else:
                outcomes.append(rebuild_error(result))
        return outcomes, reply["seconds"]

    # -- published values: beyond the life of their client ------------------------------------

    def publish(self, name, item, *, timeout=None):
        """Keep a value beyond this client's life, findable by ``name`` from any client."""
        return self.sync(self._publish, name, self._key_of(item), timeout=timeout)

    async def _publish(self, name, key):
        await self._rpc(self.center).publish(name=name, key=key)
        self._kept.add(key)

    def published(self, name, *, timeout=None):
        """The RemoteData published as ``name`` (KeyError if none is)."""
        return self.sync(self._published_as, name, timeout=timeout)

    async def _published_as(self, name):
        reply = await self._rpc(self.center).published(name=name)
        if reply["status"] == "unknown-name":
            raise KeyError(f"nothing is published as {name!r}")
        return RemoteData(reply["key"], self)

    def unpublish(self, name, *, timeout=None):
        """Stop keeping the value published as ``name``: it is freed unless a live client
        still holds it."""
        return self.sync(self._unpublish, name, timeout=timeout)

    async def _unpublish(self, name):
        reply = await self._rpc(self.center).unpublish(name=name)
        if reply["status"] == "unknown-name":
            raise KeyError(f"nothing is published as {name!r}")
        self._kept.discard(reply["key"])

    def where(self, key):
        """Addresses this client believes hold ``key`` (may be stale)."""
        return set(self._reachable(self._where.get(key, ())))

    def known_nbytes(self, key):
        return self._nbytes.get(key)

    # -- freeing values no longer referenced --------------------------------------------------

    def _incref(self, key):
        """Called on the loop thread, where every RemoteData of ours is made."""
        self._refcount[key] += 1

    def _decref(self, key):
        """From any thread, also from inside a garbage collection: never blocks, no lock.

        The key is handed to the loop, which does the counting.
        """
        self._dropped.append(key)  # atomic
        if not self._drops_scheduled and not self.closed:
            self._drops_scheduled = True
            try:
                self._loop.call_soon(self._apply_drops)
            except RuntimeError:  # the loop is closed: the cluster goes away anyway
                pass

    def _apply_drops(self):
        self._drops_scheduled = False  # before taking them: a later drop schedules again
        while self._dropped:
            key = self._dropped.popleft()
            self._refcount[key] -= 1
            if self._refcount[key] <= 0:
                del self._refcount[key]
                self._deleted.discard(key)
                self._released.add(key)
        if self._released and not self.closed and (
                self._release_task is None or self._release_task.done()):
            self._release_task = asyncio.get_running_loop().create_task(self._release())
            self._release_task.add_done_callback(log_failure("freeing released values"))

    async def _release(self):
        while self._released:
            await asyncio.sleep(0.01)  # let a burst of releases collect into one message
            keys = [k for k in self._released if k not in self._refcount and k not in self._kept]
            self._released.clear()
            try:
                await self._delete(keys)
            except BaseException:  # cancelled by close, or failed: close frees them
                self._released.update(k for k in keys if k not in self._refcount)
                raise

    # -- lifetime ------------------------------------------------------------------------------

    def close(self, *, free=True):
        """Free the values this client made, close connections, stop an owned cluster."""
        if self.closed:
            return
        try:
            self._loop.run(self._close() if free else self._close_connections(),
                           timeout=self.timeout)
        except Exception as e:
            logger.warning("could not free this client's values on close: %s", e)
        finally:
            self.closed = True
            self._loop.stop()
            if self.cluster is not None:
                self.cluster.close()

    async def _close_connections(self):
        self.pool.close()

    async def _close(self):
        self._apply_drops()
        for task in (self._release_task, self._watch_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            if self.cluster is None:  # an owned cluster is about to go away with its values
                await self._delete((set(self._refcount) | self._released) - self._kept)
                try:  # the center frees what we could not find
                    await self._rpc(self.center).unregister_client(client=self.owner)
                except (CommClosedError, OSError) as e:
                    logger.info("could not tell center %s this client closed: %s",
                                self.center, e)
        finally:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Client center={self.center} workers={len(self.ncores)}>"


async def _limited(coro, timeout, what):
    async with time_limit(timeout, what):
        return await coro


REFERENCES = (RemoteData, KeyRef)  # how arguments name values held by the workers
REMAKE_ATTEMPTS = 3
WATCH_SECONDS = 1.0  # how often computations in flight are checked against the center
