"""Pool: map / apply over a d3arrow cluster, computing where the inputs already live.

Placement is decided here, in the client: ``map`` over RemoteData queues each call on a
worker holding its input; ``apply`` goes to the worker holding the most input bytes.
Each worker then runs ``ncores`` slots that take batches from its own queue and, once it
is empty, steal from the longest queue of another worker (whose inputs then travel peer
to peer).
"""

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .addressing import address_tuple
from .calls import Call
from . import graphs
from .client import WATCH_SECONDS, Client
from .core import RecentFailures
from .direct import DirectCallFailed
from .functions import wire_form as _serialize_function
from .errors import (CommClosedError, MissingDataError, RemoteExit, SpillError,
                     WorkerPausedError)
from .progress import progress_bar
from .references import RemoteData, not_made, wait_for
from .scheduling import (PAUSED_RETRY_SECONDS, Deaths, Pace, Turns, choose_worker,
                         split_in_runs, take_batch)

logger = logging.getLogger(__name__)

# requests in hand per core: one runs while the next is on its way, so cores do not wait
# on round trips
SLOTS_PER_CORE = 2

Workers = Iterable[str | tuple[str, int]] | None  # addresses to restrict work to



class Pool:
    """A pool of workers that keeps results remote until gathered.

    Parameters
    ----------
    address : str or (str, int), optional
        The center, ``'host:port'``. Without one, a LocalCluster is started and owned by
        the pool (stopped by :meth:`close`).
    timeout : float, default 30
        Seconds to wait for control replies (computations may take as long as they take).
    auth_token, tls_cert, tls_key, tls_ca : optional
        How to reach a cluster that requires a token or TLS (see :class:`~d3arrow.Client`).
    **cluster_kwargs
        Passed to :class:`~d3arrow.LocalCluster` when no address is given
        (``n_workers``, ``ncores``, ...).

    Examples
    --------
    >>> pool = Pool('127.0.0.1:8787')                        # doctest: +SKIP
    >>> A = pool.map(lambda x: x**2, range(10))              # doctest: +SKIP
    >>> B = pool.map(lambda x: -x, A)                        # doctest: +SKIP
    >>> pool.apply(sum, [B]).get()                           # doctest: +SKIP
    -285
    """

    def __init__(self, address=None, **kwargs):
        self._running = collections.Counter()  # address -> calls in hand there, all runs
        self._ready = {}  # (function id, workers) -> submitted calls ready to run together
        self._paused = RecentFailures(1.0)  # workers that said they are over their limit
        self._turns = Turns()  # requests in flight per worker, over all runs
        self._runs = itertools.count()  # first come, first served among equals
        self._direct_running = collections.Counter()  # calls in hand from callers' threads
        self._direct_lock = threading.Lock()
        self.client = Client(address, **kwargs)
        try:
            self.sync_center()
        except BaseException:
            self.client.close()
            raise

    @property
    def center(self) -> str:
        return self.client.center

    def sync_center(self) -> None:
        """Refresh the workers and their cores from the center."""
        self.client.sync_ncores()

    @property
    def available_cores(self) -> dict[tuple[str, int], int]:
        """``{(host, port): ncores}`` as of the last :meth:`sync_center`."""
        return {address_tuple(a): n for a, n in self.client.ncores.items()}

    def map(self, func: Callable, seq: Iterable, *more: Iterable, workers: Workers = None,
            timeout: float | None = None, progress: bool | None = None) -> list[RemoteData]:
        """Apply ``func`` to each element of ``seq`` on the cluster.

        Parameters
        ----------
        func : callable
            Lambdas and closures work (cloudpickle).
        seq, *more : iterable
            Plain values or RemoteData (also pending ones, from :meth:`submit`); a call on
            RemoteData runs where it lives. With several iterables, ``func`` takes one
            element of each, as the builtin ``map``, until the shortest ends.
        workers : list of addresses, optional
            ``'host:port'`` or ``(host, port)``: run only there.
        timeout : float, optional
            Give up after this many seconds (TimeoutError); calls still running are
            abandoned and their results dropped. Without one, a map waits as long as its
            calls run, but never on a worker the center has dropped (its calls move on).
        progress : bool, optional
            Show a tqdm bar of the calls done (default: when standard error is a terminal
            and tqdm is installed; True without tqdm raises ImportError).

        Returns
        -------
        list of RemoteData
            One per element, in order; the values stay on the workers.

        Raises
        ------
        Exception
            The first exception raised by ``func``, with the remote traceback as cause.
        MissingDataError
            An input is held by no live worker.
        LostDataError
            An input was lost with its workers and cannot be made again (it was scattered).
        TypeError
            ``func`` or an element cannot be pickled.
        TimeoutError
            Not done within ``timeout``.
        """
        arguments = list(zip(seq, *more))
        bar = progress_bar(len(arguments), _name(func), progress)
        try:
            return self.client.sync(self._map, func, arguments, workers=workers,
                                    timeout=timeout, on_outcome=None if bar is None else (
                                        lambda index, outcome: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()

    async def _map(self, func, arguments, *, workers=None, on_outcome=None):
        function = _serialize_function(func)
        calls = [Call.of(self.client.keys.new(), args) for args in arguments]
        return await self._run(function, calls, workers, name=_name(func),
                               on_outcome=on_outcome)

    def submit(self, func: Callable, /, *args: Any, workers: Workers = None,
               **kwargs: Any) -> RemoteData:
        """Run ``func(*args, **kwargs)`` as soon as its inputs exist; return at once.

        ``args`` and ``kwargs`` may hold RemoteData, also pending ones (the results of
        other submits), nested in lists, tuples, sets and dict values. The task runs on the
        worker holding most of its input bytes once every input exists; its result stays
        there. The returned RemoteData is a future: ``done()``, ``result()`` (the value),
        ``exception()``, ``cancel()``, ``add_done_callback()``; see also
        :func:`d3arrow.wait` and :func:`d3arrow.as_completed`.

        A task whose input failed fails with that input's error; cancelling a task cancels
        the tasks that wait for it. Lineage and ``allowed_failures`` apply as for
        :meth:`map`.

        Raises
        ------
        TypeError
            ``func`` cannot be pickled (at once, not when the task runs).
        """
        function = _serialize_function(func)
        call = Call.of(self.client.keys.new(), args, kwargs)
        return self.client.sync(self._submit, function, call, workers, _name(func))

    async def _submit(self, function, call, workers, name):
        state = concurrent.futures.Future()
        result = RemoteData(call.key, self.client, owned=True, state=state)
        result._depth = _depth(call)
        task = self.client.spawn(self._run_submitted(function, call, result, workers, name),
                                 f"task {call.key}")
        loop = asyncio.get_running_loop()
        state.add_done_callback(  # cancelled by the user: stop the task too
            lambda s: s.cancelled() and loop.call_soon_threadsafe(task.cancel))
        return result

    async def _run_submitted(self, function, call, result, workers, name):
        state = result._state
        try:
            failure = await wait_for(call.inputs)
            if failure is not None:
                raise failure
            made = await self._dispatch(function, call, workers, name)
            result._recipe = made._recipe
            if not state.done():
                state.set_result(None)
        except asyncio.CancelledError:  # by the user, or an input was cancelled: as dask
            state.cancel()
        except BaseException as e:
            if not state.done():
                state.set_exception(e)

    async def _dispatch(self, function, call, workers, name):
        """Run a submitted call whose inputs exist; its RemoteData.

        Calls of one function that become ready in the same turn of the loop run together,
        as one ``map`` would: batched per worker, stolen by idle ones.
        """
        group = (id(function), None if workers is None else tuple(workers), _depth(call))
        if group not in self._ready:
            self._ready[group] = (function, workers, name, [])
            if len(self._ready) == 1:
                asyncio.get_running_loop().call_soon(self._dispatch_ready)
        done = asyncio.get_running_loop().create_future()
        self._ready[group][3].append((call, done))
        return await done

    def _dispatch_ready(self):
        ready, self._ready = self._ready, {}
        for function, workers, name, entries in ready.values():
            self.client.spawn(self._run_ready(function, workers, name, entries),
                              "running submitted tasks")

    async def _run_ready(self, function, workers, name, entries):
        """Run calls that became ready together; each one's waiter hears of its outcome as
        its batch comes back, so what depends on it starts before the rest are done."""
        entries = [(call, done) for call, done in entries if not done.done()]  # cancelled

        def settle(index, outcome):
            done = entries[index][1]
            if done.done():
                return
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

        try:
            outcomes = await self._run_calls(function, [call for call, _ in entries], workers,
                                             name=name, on_outcome=settle)
        except asyncio.CancelledError:  # the client closes
            for _, done in entries:
                done.cancel()
            raise
        except Exception as e:  # no worker left to run them
            outcomes = [e] * len(entries)
        for index, outcome in enumerate(outcomes):  # those lost for good, or never run
            settle(index, outcome)

    def apply(self, func: Callable, args: Sequence = (), kwargs: dict | None = None, *,
              workers: Workers = None, timeout: float | None = None) -> RemoteData:
        """Run ``func(*args, **kwargs)`` on the worker holding most of its input bytes.

        ``args`` and ``kwargs`` may hold RemoteData, also inside lists, tuples and dicts;
        the function receives their values. Returns a RemoteData. Errors and ``timeout``
        as for :meth:`map`.
        """
        started = time.monotonic()
        function = _serialize_function(func)
        call = Call.of(self.client.keys.new(), args, kwargs)
        result, died = self._apply_direct(function, call, workers, timeout, _name(func))
        if result is not None:
            return result
        return self.client.sync(self._run_one, function, call, workers, _name(func), died,
                                timeout=timeout, what="apply", started=started)

    def _apply_direct(self, function, call, workers, timeout, name):
        """Run one call from the caller's thread, straight to its worker and back (see
        d3arrow.direct): ``(RemoteData, None)``; or ``(None, died)`` where the client's
        loop must run it: an input is pending or went missing, the worker is paused, or
        the connection failed (``died``: a Deaths that counts it, if it had the call).
        """
        client = self.client
        if client.closed or not client.ncores or not all(r.exists() for r in call.inputs):
            return None, None
        address = self._worker_for(call, workers)
        msg = client.compute_request(address, function, [call])
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._direct_lock:
            self._direct_running[address] += 1
        try:
            reply = client.direct.link(address).request(
                msg, deadline=deadline, watch=WATCH_SECONDS,
                still_there=lambda: not client.sync(client._given_up, address))
            (outcome,), _ = client.compute_outcomes(address, function, [call], reply)
        except DirectCallFailed as e:
            if client.closed:
                raise RuntimeError("this client is closed") from None
            if not e.sent:
                return None, None
            logger.warning("worker %s failed (%s) with a call of %s in hand: running it "
                           "elsewhere", address, e, name)
            deaths = Deaths(client.allowed_failures, name)
            given_up = deaths.record([0], address).get(0)
            if given_up is not None:
                raise given_up from None
            return None, (address, deaths)
        except TimeoutError:
            if timeout is None:
                raise
            raise TimeoutError(f"apply not done within {timeout:g} s") from None
        except WorkerPausedError:
            self._paused.add(address)
            return None, None
        finally:
            with self._direct_lock:
                self._direct_running[address] -= 1
        if type(outcome) is MissingDataError:  # an input was lost: lineage, on the loop
            return None, None
        if isinstance(outcome, RemoteExit):
            raise outcome.exc
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome, None

    def _worker_for(self, call, workers):
        """Where one call runs, placed as :meth:`_run_some` places a call alone."""
        client = self.client
        chosen = client.choose_workers(workers)
        live = client.placement.reachable(chosen) or chosen
        queues = dict.fromkeys(live, ())
        address = self._place(call, queues)
        if address is None:  # nothing ties it anywhere: where split_in_runs puts one call,
            # the least loaded per core, the first among equals
            address = min(live, key=lambda a: self._load(a, queues))
        return self._unpaused(address, queues)

    def _load(self, address, queues):
        """Calls per core ``address`` would have with one more: those queued for it here
        and those in hand there."""
        return ((len(queues[address]) + self._in_hand(address) + 1)
                / self.client.ncores.get(address, 1))

    def _in_hand(self, address):
        """Calls sent to ``address`` and not yet back, from the loop and from callers'
        threads (read without the lock: a count off by one only moves a placement)."""
        return self._running.get(address, 0) + self._direct_running.get(address, 0)

    async def _run_one(self, function, call, workers, name, died=None):
        """One call on the loop (after :meth:`_apply_direct` could not run it)."""
        deaths = None
        if died is not None:
            address, deaths = died
            self.client._failed(address)
        (result,) = await self._run(function, [call], workers, name=name, deaths=deaths)
        return result

    def apply_async(self, func: Callable, args: Sequence = (), kwargs: dict | None = None, *,
                    workers: Workers = None) -> "AsyncResult":
        """Like :meth:`apply` but return at once; ``.get()`` on the result gives the RemoteData."""
        function = _serialize_function(func)
        call = Call.of(self.client.keys.new(), args, kwargs)
        return AsyncResult(self.client.submit(self._run_one, function, call, workers,
                                              _name(func)))

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """A dask scheduler: ``dask.compute(x, scheduler=pool.get)``, ``x.compute(scheduler=
        pool.get)`` or ``dask.config.set(scheduler=pool.get)``.

        Runs any graph of the installed dask (``pip install d3arrow[dask]``) on the
        cluster: each task on the worker holding most of its input bytes, intermediate
        results freed as soon as no pending task needs them; only ``keys`` travel back.
        ``progress=True`` (``dask.compute(x, scheduler=pool.get, progress=True)``) shows a
        tqdm bar of the graph's tasks (default: when standard error is a terminal and tqdm
        is installed). Other keyword arguments dask passes to schedulers are accepted and
        ignored.
        """
        prepared = graphs.prepare(dsk)
        bar = progress_bar(len(prepared.nodes), "graph", kwargs.get("progress"))
        try:
            return self.client.sync(self._get, prepared, keys,
                                    None if bar is None else lambda: bar.update(1), what="get")
        finally:
            if bar is not None:
                bar.close()

    async def _get(self, prepared, keys, on_node=None):
        futures = await self._run_graph(prepared, graphs.wanted_keys(keys), on_node)
        values = await self.client.values_of(list(futures.values()))
        return graphs.nested(keys, dict(zip(futures, values)))

    def persist(self, collection: Any) -> Any:
        """Compute a dask collection on the cluster and keep its chunks there.

        Returns the same kind of collection, whose graph names the chunks held by the
        workers (RemoteData): later graphs built on it start from them.
        """
        prepared = graphs.prepare(collection.__dask_graph__())
        keys = graphs.wanted_keys(collection.__dask_keys__())
        futures = self.client.sync(self._run_graph, prepared, keys, what="persist")
        rebuild, extra = collection.__dask_postpersist__()
        return rebuild(futures, *extra)

    async def _run_graph(self, prepared, keys, on_node=None):
        """``{key: RemoteData}`` of ``keys``, once the graph has run on the cluster."""
        return await graphs.run_graph(self, _serialize_function(graphs.run_node), prepared,
                                      keys, on_node)

    def gather(self, remote_data: RemoteData | str | Iterable[RemoteData | str], *,
               timeout: float | None = None) -> Any:
        """Fetch the values of a list of RemoteData (or a single one)."""
        if isinstance(remote_data, (RemoteData, str)):  # one value (by reference or key)
            return self.client.gather([remote_data], timeout=timeout)[0]
        return self.client.gather(list(remote_data), timeout=timeout)

    def scatter(self, data: Iterable | dict, *, workers: Workers = None,
                timeout: float | None = None) -> list[RemoteData] | dict[str, RemoteData]:
        """Send values to the workers, as :meth:`Client.scatter`.

        A list (or any iterable) gives a list of RemoteData; a dict ``{name: value}`` gives
        ``{name: RemoteData}``, the names this pool's own (see :meth:`publish` to share).
        """
        if not isinstance(data, dict):
            data = list(data)
        return self.client.scatter(data, workers=workers, timeout=timeout)

    def publish(self, name: str, remote_data: RemoteData, *,
                timeout: float | None = None) -> None:
        """Keep a value beyond this pool's life, under a name any client can look up.

        Values belong to the client that made them: they are freed when it closes, or
        when it is gone (killed, or ended without closing) for longer than the center's
        heartbeat timeout. A published value stays until :meth:`unpublish`.
        """
        self.client.publish(name, remote_data, timeout=timeout)

    def published(self, name: str, *, timeout: float | None = None) -> RemoteData:
        """The RemoteData published as ``name`` (by this or any client); KeyError if none."""
        return self.client.published(name, timeout=timeout)

    def unpublish(self, name: str, *, timeout: float | None = None) -> None:
        """Stop keeping the value published as ``name``."""
        self.client.unpublish(name, timeout=timeout)

    def delete(self, remote_data: Iterable[RemoteData | str], *,
               timeout: float | None = None) -> None:
        """Free these values on every worker that holds them."""
        self.client.delete(list(remote_data), timeout=timeout)

    def store_info(self) -> dict[str, dict | None]:
        """Each worker's shared store: ``{address: {capacity, used, fallbacks, ...}}``."""
        return self.client.store_info()

    def memory_info(self) -> dict[str, dict]:
        """Each worker's memory: ``{address: {limit, memory, spilled_bytes, spilled_count,
        paused, ...}}`` (see :meth:`Client.memory_info`)."""
        return self.client.memory_info()

    def status(self) -> dict:
        """The cluster's workers and totals, as ``d3arrow status --json`` prints them (see
        :meth:`Client.status`)."""
        return self.client.status()

    def close(self) -> None:
        """Free this pool's values, close its connections and stop an owned cluster."""
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Pool center={self.center} cores={sum(self.client.ncores.values())}>"

    # -- scheduling ----------------------------------------------------------------------------

    async def _run(self, function, calls, workers, *, name, on_outcome=None, deaths=None):
        """Place each call, run them all, return their RemoteData in order (or raise the
        first call's exception)."""
        outcomes = await self._run_calls(function, calls, workers, name=name,
                                         on_outcome=on_outcome, deaths=deaths)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def _run_calls(self, function, calls, workers, *, name, pace=None, on_outcome=None,
                         deaths=None):
        """Place each call, run them all: per call its RemoteData or its exception.

        ``on_outcome(index, outcome)``, if given, hears of each call's outcome as soon as
        its batch is back (not of inputs found missing: those calls run again).

        Where runs compete for a worker, the one whose calls are deeper in a chain of
        submitted tasks goes first (it finishes what was started, and frees its inputs),
        then the older one.

        A call whose input was lost with its workers runs again once the input has been
        made again from its lineage. A call in hand each time a worker died is given up
        after ``allowed_failures + 1`` deaths (KilledWorkerError).
        """
        client = self.client
        if not client.ncores:
            await client.refresh_workers()
        outcomes = _Outcomes(len(calls), on_outcome)
        # pending inputs (from submit) must exist first
        for i in not_made([call.inputs for call in calls]):
            inputs = calls[i].inputs
            if not all(r.exists() for r in inputs):
                failure = await wait_for(inputs)
                if failure is not None:
                    outcomes.arrived(i, failure)
        pending = [i for i in range(len(calls)) if outcomes[i] is None]
        deaths = deaths or Deaths(client.allowed_failures, name)
        pace = pace or Pace()
        priority = (-_depth(*calls), next(self._runs))

        async def attempt():
            nonlocal pending
            await self._run_some(function, calls, pending, outcomes, workers, deaths, pace,
                                 priority)
            pending = [i for i in pending if type(outcomes[i]) is MissingDataError]
            return {k for i in pending for k in outcomes[i].keys}

        try:
            await client.lineage.retry(attempt)
        except MissingDataError as e:  # lost for good, or deleted: that is the answer
            for i in pending:
                outcomes.arrived(i, e)
        return list(outcomes)

    async def _run_some(self, function, calls, indices, outcomes, workers, deaths, pace,
                        priority):
        client = self.client
        chosen = client.choose_workers(workers)
        live = client.placement.reachable(chosen) or chosen
        queues = {address: collections.deque() for address in live}
        loose = []  # calls that nothing ties to a worker
        where = client.placement.known_holders()
        for index in indices:
            address = self._place(calls[index], queues, where)
            if address is None:
                loose.append(index)
            else:
                queues[address].append(index)
        for address, run in split_in_runs(loose, list(queues), client.ncores, {
                a: len(queues[a]) + self._in_hand(a) for a in queues}).items():
            queues[address].extend(run)
        while any(queues.values()):
            if len(indices) == 1:  # one slot is enough: no tasks to create, no loop turns
                (address,) = (a for a in queues if queues[a])
                await self._slot(address, function, calls, queues, outcomes, pace, deaths,
                                 priority)
            else:
                await asyncio.gather(*(
                    self._slot(address, function, calls, queues, outcomes, pace, deaths,
                               priority)
                    for address in _slotted(queues, client.ncores)
                    for _ in range(SLOTS_PER_CORE * client.ncores.get(address, 1))))
            if not queues:
                raise CommClosedError("every worker this computation could use has died")

    def _place(self, call, queues, where=None):
        """The worker holding the most input bytes (the least loaded among equals: its
        queue here and the calls other runs have in hand there); else the one the call
        prefers, if it is live; else None: nothing ties the call anywhere. ``where``:
        Placement.known_holders(), read for many calls at once (None: asked per call)."""
        needs = call.needs
        if type(needs) is str or len(needs) == 1:  # one input (a map's): choose_worker's
            key = needs if type(needs) is str else needs[0]  # rule, no sizes
            holders = (where.get(key, ()) if where is not None
                       else self.client.placement.holders(key))
            if len(holders) == 1 and holders[0] in queues:  # the usual case
                return holders[0]
            if holders:
                here = [a for a in holders if a in queues]
                return here[0] if len(here) == 1 else min(
                    here or queues, key=lambda a: self._load(a, queues))
            return call.prefer if call.prefer in queues else None
        held = needs and self.client.placement.held_bytes(needs)
        if not held:
            return call.prefer if call.prefer in queues else None
        return choose_worker(held, queues, lambda a: self._load(a, queues))

    async def _slot(self, address, function, calls, queues, outcomes, pace, deaths,
                    priority):
        """Run batches from ``address``'s queue (or stolen ones) until none is left.

        They run on ``address``, unless it said lately that it is over its memory limit:
        then on the least loaded worker that did not.
        """
        limit = SLOTS_PER_CORE * self.client.ncores.get(address, 1)
        every_worker_paused = False
        while address in queues:
            if every_worker_paused:  # all spilling: ask later, holding no turn meanwhile
                await asyncio.sleep(PAUSED_RETRY_SECONDS)
                every_worker_paused = False
            async with self._turns.turn(address, limit, priority):
                # from its own queue, with every worker allowed: placed where its inputs
                # are, the worker needs no hints (else it steals, or holders were left out)
                placed = bool(queues[address]) and len(queues) == len(self.client.ncores)
                batch = take_batch(address, queues, self.client.ncores, pace.batch_size())
                if not batch:
                    return
                if len(batch) > 1 and deaths.suspects.intersection(batch):
                    queues[address].extendleft(reversed(batch[1:]))  # suspects travel alone
                    batch = batch[:1]
                target = self._unpaused(address, queues)
                sent = []
                self._running[target] += len(batch)
                try:
                    results, seconds = await self.client.compute(
                        target, function, [calls[i] for i in batch],
                        on_sent=lambda: sent.append(True), placed=placed and target == address)
                    pace.record(len(batch), seconds)
                except WorkerPausedError as e:  # over its memory limit: the calls go elsewhere
                    self._paused.add(target)
                    if self._unpaused(address, queues) in self._paused.recent():
                        if e.cannot_spill:  # nowhere else, and it will not make room
                            for index in batch:
                                outcomes.arrived(index, SpillError(e.cannot_spill))
                            continue
                        every_worker_paused = True
                    queues[address].extendleft(reversed(batch))
                    continue
                except CommClosedError as e:  # the client leaves it out from now on
                    if self.client.closing:  # not the worker's doing: nothing to retry
                        raise  # (Client.sync says the client was closed)
                    retry = batch
                    if sent:  # it died (or froze) with these calls in hand
                        for index, error in deaths.record(batch, target).items():
                            outcomes.arrived(index, error)
                        retry = [i for i in batch if outcomes[i] is None]
                    logger.warning("worker %s failed (%s): moving %d calls elsewhere",
                                   target, e, len(retry))
                    orphans = queues.pop(target, collections.deque())
                    if queues:
                        survivor = min(queues, key=lambda a: len(queues[a]))
                        queues[survivor].extend([*retry, *orphans])
                    if target == address:
                        return
                    continue
                finally:
                    self._running[target] -= len(batch)
                for index, outcome in zip(batch, results):
                    outcomes.arrived(index, outcome)

    def _unpaused(self, address, queues):
        """``address``, or if it is over its memory limit the least loaded live worker
        that is not (``address`` again if every one is)."""
        paused = self._paused.recent()
        if address not in paused:
            return address
        others = [a for a in queues if a not in paused]
        if not others:
            return address
        return min(others, key=lambda a: self._load(a, queues))


def _slotted(queues, ncores):
    """The workers that get slots: those with calls queued, and the idle ones too only where
    those calls are more than their slots can take at once (then the idle steal). A small
    map on a big cluster starts a few slots, not two per core of every worker."""
    busy = [a for a in queues if queues[a]]
    queued = sum(len(queues[a]) for a in busy)
    if queued > sum(SLOTS_PER_CORE * ncores.get(a, 1) for a in busy):
        return list(queues)
    return busy


class _Outcomes(list):
    """Per call its outcome (None until it is known), telling ``on_outcome`` of each."""

    def __init__(self, n, on_outcome=None):
        super().__init__([None] * n)
        self.on_outcome = on_outcome

    def arrived(self, index, outcome):
        self[index] = outcome
        if self.on_outcome is not None and type(outcome) is not MissingDataError:
            self.on_outcome(index, outcome)


def _depth(*calls):
    """How many submitted tasks lead up to the deepest of ``calls``: one more than its
    deepest input."""
    return max([ref._depth for call in calls for ref in call.inputs], default=-1) + 1


def _name(func):
    return getattr(func, "__qualname__", None) or repr(func)


class AsyncResult:
    """The pending result of :meth:`Pool.apply_async`."""

    def __init__(self, future):
        self._future = future

    def get(self, timeout: float | None = None) -> RemoteData:
        """Wait for the computation; return its RemoteData or raise its exception."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"result not ready within {timeout} s") from None
        except RemoteExit as e:
            raise e.exc  # its __cause__ is the remote traceback

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self._future], timeout)

    def ready(self) -> bool:
        return self._future.done()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("result is not ready")
        return self._future.exception() is None
