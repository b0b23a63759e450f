"""A worker's link to its center: registration, heartbeats, and key updates in order.

Updates (``add_keys`` / ``remove_keys``) travel over one connection kept for them, in the
order they were made; their answers are read in order in the background. Most are written
at once: an update made before a worker's reply to a caller reaches the center first, with
no round trip in between. Results of computations are the exception (``tell_soon``): the
caller that asked for them hears where they are from the reply itself, so the center hears
of them within ``UPDATE_BATCH_SECONDS``, many in one update, and never of those freed
before then (a caller's ``apply(f).get()`` in a loop frees each result a few ms later).
A message to the center costs about as much CPU as a small computation (two processes
woken), and a stream of small calls would otherwise pay it once per call; on a busy
machine that is the CPU their round trips wait for.
Heartbeats go over pooled connections, back off while the center is away, and bring back
the keys of vanished clients the worker should free.
"""

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable

from .comm import connect
from .core import DEFAULT_TIMEOUT, HEARTBEAT_INTERVAL, ConnectionPool, Tasks
from .errors import CommClosedError
from .metadata import center_rpc, close_center_rpc, is_redis, shown
from .security import NO_SECURITY, Security
from .values import Values

logger = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 4  # while the center is unreachable, retry at most 4 heartbeats apart
# results made meanwhile are told to the center together; longer than a client takes to
# free what it dropped (d3arrow.references.RELEASE_DELAY), so short-lived ones never are
UPDATE_BATCH_SECONDS = 0.05
# a key the center knows no holder of may be a result told in the next batch: whoever
# looks for it asks again after two batches
ASK_AGAIN_SECONDS = 2 * UPDATE_BATCH_SECONDS


class CenterLink:
    """What a worker says to its center, and when.

    Parameters
    ----------
    center : str
        The center's address.
    pool : ConnectionPool
        The worker's connections (heartbeats and queries use it).
    values : Values
        What the worker holds: registration reports it all.
    on_release : async callable(keys)
        Frees values the center says belong to clients that are gone.
    """

    def __init__(self, center: str, pool: ConnectionPool, values: Values, *,
                 on_release: Callable[[list[str]], Awaitable[object]],
                 metrics: Callable[[], dict] = dict,
                 security: Security = NO_SECURITY) -> None:
        self.center = center
        self.shown_center = shown(center)  # for messages: no password
        self.pool = pool
        self.values = values
        self.security = security
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self.address: str | None = None
        self._identity: dict = {}
        self._on_release = on_release
        self._metrics = metrics  # what each heartbeat carries to the center
        self._tasks = Tasks()
        self._updates_comm = None  # a connection to the center for add/remove_keys only
        self._updates_pending = collections.deque()  # their answers, in order
        self._updates_lock = asyncio.Lock()
        self._last_update = None  # resolved once the center answered the latest update
        self._soon = []  # results to tell the center of with the next batch
        self._soon_timer = None
        self._registering = None
        self.heartbeats: asyncio.Task | None = None
        self._closing = False

    @property
    def rpc(self):
        return center_rpc(self.pool, self.center, timeout=DEFAULT_TIMEOUT)

    async def start(self, address: str, **identity) -> None:
        """Register as ``address`` (with ``ncores``, ``name``) and start heartbeating."""
        self.address, self._identity = address, identity
        await self._register()
        if not is_redis(self.center):  # opened now, not with the first update: a center
            try:  # frozen by then would hold up whatever waits for that update (a fetch)
                await self._open_updates_link()
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("no link for updates to center %s yet: %s", self.shown_center, e)
        self.heartbeats = self._tasks.spawn(self._heartbeat(), "heartbeats to the center")

    async def close(self, *, unregister: bool = True) -> None:
        self._closing = True
        if self._soon_timer is not None:
            self._soon_timer.cancel()
        await self._tasks.close()
        if self._updates_comm is not None:
            self._updates_comm.abort()
        if unregister and self.address is not None:
            try:
                await asyncio.wait_for(self.rpc.unregister(address=self.address), 2)
            except (OSError, TimeoutError, CommClosedError) as e:
                logger.info("could not unregister from center %s: %s", self.shown_center, e)
        await close_center_rpc(self.center)

    async def _register(self) -> None:
        keys = list(self.values)
        reply = await self.rpc.register(address=self.address, keys=keys,
                                        nbytes=self.values.nbytes_of(keys), **self._identity)
        self.heartbeat_interval = reply.get("heartbeat_interval", HEARTBEAT_INTERVAL)

    async def _heartbeat(self) -> None:
        """Heartbeats; while the center is away, retries that back off, then registration.

        A restarted center knows nothing: it answers ``unknown-worker`` and we register
        again with every key we hold, so its ``who_has`` is whole again.
        """
        failures = 0
        while True:
            delay = self.heartbeat_interval * min(2 ** failures, MAX_BACKOFF_FACTOR)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0) if failures else delay)
            try:
                reply = await self.rpc.heartbeat(address=self.address,
                                                 metrics=self._metrics())
                self.heartbeat_interval = reply.get("heartbeat_interval",
                                                    self.heartbeat_interval)
                if reply["status"] == "unknown-worker":
                    self.register_again()
                elif reply.get("release"):  # values of clients that are gone
                    logger.info("freeing %d values whose client is gone", len(reply["release"]))
                    await self._on_release(reply["release"])
                failures = 0
            except (OSError, TimeoutError, CommClosedError) as e:
                failures += 1
                (logger.warning if failures == 1 else logger.info)(
                    "heartbeat to center %s failed (%d in a row): %s", self.shown_center, failures, e)

    def tell_soon(self, keys) -> None:
        """Tell the center of these results within UPDATE_BATCH_SECONDS, together with the
        others made meanwhile (any :meth:`tell` sends them first: order is kept)."""
        if not keys or self._closing:
            return
        self._soon.extend(keys)
        if self._soon_timer is None:
            self._soon_timer = asyncio.get_running_loop().call_later(
                UPDATE_BATCH_SECONDS, self._tell_batch)

    def _tell_batch(self):
        self._soon_timer = None
        if self._soon:
            self._tasks.spawn(self.tell("add_keys", []), "telling the center of results")

    async def tell(self, op: str, keys, *, applied: bool = False) -> None:
        """Tell the center of keys added here (``add_keys``) or removed (``remove_keys``).

        It hears of them in call order; added keys together with the results
        :meth:`tell_soon` still holds. A removal leaves those where they are: the ones it
        removes are no longer held when the batch goes, so the center never hears of
        them. With ``applied``, wait until it has applied this one.
        """
        if self._soon and op == "add_keys":
            soon, self._soon = self._soon, []
            if self._soon_timer is not None:
                self._soon_timer.cancel()
                self._soon_timer = None
            keys = [*soon, *keys]
        await self._update(op, keys, applied=applied)

    async def told(self) -> None:
        """Once the center has applied every update sent so far, the results
        :meth:`tell_soon` held included (a batch may be on its way already)."""
        if self._soon:
            await self.tell("add_keys", [])
        if self._last_update is not None:
            await self._applied(self._last_update)

    async def _applied(self, answered):
        try:
            await asyncio.wait_for(asyncio.shield(answered), DEFAULT_TIMEOUT)
        except TimeoutError:
            logger.warning("center %s did not apply an update within %s s", self.shown_center,
                           DEFAULT_TIMEOUT)

    async def _update(self, op, keys, *, applied=False):
        keys = [k for k in keys if k in self.values] if op == "add_keys" else list(keys)
        if not keys:
            return
        msg = {"op": op, "address": self.address, "keys": keys}
        if op == "add_keys":
            msg["nbytes"] = self.values.nbytes_of(keys)
        answered = self._last_update = asyncio.get_running_loop().create_future()
        if is_redis(self.center):  # applied in call order, each before the next is sent
            try:
                await self._tell_redis(msg)
            finally:
                answered.set_result(None)
            return
        try:
            comm = self._updates_comm
            if comm is None or comm.closed:
                comm = await self._open_updates_link()
            self._updates_pending.append(answered)
            await comm.send(msg, silence=DEFAULT_TIMEOUT)
        except (OSError, TimeoutError, CommClosedError) as e:
            logger.warning("could not tell center %s of %d keys: %s", self.shown_center, len(keys), e)
            answered.done() or answered.set_result(None)  # not applied: nothing to wait for
            return
        if applied:
            await self._applied(answered)

    async def _tell_redis(self, msg):
        op = msg.pop("op")
        try:
            reply = await getattr(self.rpc, op)(**msg)
        except (OSError, TimeoutError, CommClosedError) as e:
            logger.warning("could not tell %s of %d keys: %s", self.shown_center, len(msg["keys"]), e)
            return
        if reply.get("status") == "unknown-worker":
            self.register_again()  # Redis lost us (restarted): it gets every key we hold

    async def _open_updates_link(self):
        async with self._updates_lock:
            if self._updates_comm is None or self._updates_comm.closed:
                comm = await connect(self.center, security=self.security)
                self._updates_comm, self._updates_pending = comm, collections.deque()
                self._tasks.spawn(self._read_update_answers(comm, self._updates_pending),
                                  "reading the center's answers to updates")
            return self._updates_comm

    async def _read_update_answers(self, comm, pending) -> None:
        try:
            while True:
                answer = await comm.recv()
                answered = pending.popleft()
                if isinstance(answer, dict) and answer.get("status") == "unknown-worker":
                    self.register_again()  # a restarted center: it gets every key we hold
                elif not isinstance(answer, dict) or answer.get("status") != "OK":
                    logger.warning("center %s refused an update: %s", self.shown_center,
                                   answer.get("message") if isinstance(answer, dict) else answer)
                answered.done() or answered.set_result(answer)
        except (CommClosedError, IndexError):
            pass
        finally:
            comm.abort()
            for answered in pending:  # not applied: re-registration will tell it all
                answered.done() or answered.set_result(None)

    def register_again(self) -> None:
        if self._closing or (self._registering is not None and not self._registering.done()):
            return
        logger.warning("center %s does not know this worker: registering again with %d keys",
                       self.shown_center, len(self.values))
        self._registering = self._tasks.spawn(self._register(),
                                              "registering again with the center")
