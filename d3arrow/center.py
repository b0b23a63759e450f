"""The center: which worker holds which key, each worker's cores, and who is alive.

It holds metadata only; values never pass through it, and it never deserializes anything
it receives.
"""

import asyncio
import logging
import time

from .checks import check_believed, check_keys, check_owner, check_publish, check_registration
from .core import HEARTBEAT_INTERVAL, Server, Tasks
from .dashboard import Dashboard
from .keys import keys_by_owner, owner_of
from .metrics import Rates, totals_of
from .security import NO_SECURITY

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 10.0
HEARTBEATS_PER_SECOND = 200  # at most, however many workers: their interval grows beyond it


class Center(Server):
    """Metadata server.

    State (a million keys take ~200 bytes each: one holder is kept as its address alone,
    a key's size with its holder, and an owner's keys are counted, not listed)
    -----
    _who_has : {key: address, or {address} when several hold it}
    _has_what : {address: {key: nbytes, or -1 when not told}}
    _ncores : {address: int}
    _names : {address: str}
    _last_seen : {address: float}, ``time.monotonic()`` of the last message from the worker
    _clients : {owner: float}, clients alive and when they were last heard of
    _owned : {owner: int}, how many keys workers hold of each client's
    _released : owners whose values the workers were told to free (not told twice; keys
                told of later are freed as they come)
    _orphaned : {owner: float}, since when an owner holding keys has had no live client
    _published : {name: key}, values kept beyond the life of their client
    _to_release : {address: {key}}, orphans each worker hears of with its next heartbeat

    Ops: register, unregister, heartbeat, add_keys, remove_keys, who_has, has_what, ncores,
    nbytes, workers, identity, register_client, client_heartbeat, unregister_client,
    publish, unpublish, published.

    A worker that sends nothing for ``heartbeat_timeout`` seconds is dropped with its keys.
    Beyond ``heartbeats_per_second * heartbeat_interval`` workers, their interval grows
    with their number (each heartbeat's reply says it), and the timeout with it, as dask's
    do: the center answers at most ``heartbeats_per_second`` heartbeats a second.
    Values belong to the client that made them (see :mod:`d3arrow.keys`): once a client has
    been silent for ``heartbeat_timeout`` (killed, or gone without closing), the workers
    free its values, published ones excepted.
    """

    def __init__(self, *, heartbeat_interval=HEARTBEAT_INTERVAL,
                 heartbeat_timeout=HEARTBEAT_TIMEOUT, security=NO_SECURITY,
                 heartbeats_per_second=HEARTBEATS_PER_SECOND):
        super().__init__(security=security)
        self._who_has = {}
        self._has_what = {}
        self._ncores = {}
        self._names = {}
        self._last_seen = {}
        self._clients = {}
        self._owned = {}
        self._released = set()
        self._addresses = {}  # address -> the one copy of its string the tables share
        self._orphaned = {}
        self._published = {}
        self._to_release = {}
        self._metrics = {}  # worker -> the totals and gauges of its last heartbeat
        self._rates = Rates()
        self.dashboard = None  # HTTP, when asked for
        self.started = time.time()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeats_per_second = heartbeats_per_second
        self._tasks = Tasks()
        self.handlers = {
            "register": self.register,
            "unregister": self.unregister,
            "heartbeat": self.heartbeat,
            "add_keys": self.add_keys,
            "remove_keys": self.remove_keys,
            "who_has": self.who_has,
            "has_what": self.has_what,
            "ncores": self.ncores,
            "nbytes": self.nbytes,
            "workers": self.workers,
            "identity": self.identity,
            "register_client": self.register_client,
            "client_heartbeat": self.client_heartbeat,
            "unregister_client": self.unregister_client,
            "publish": self.publish,
            "unpublish": self.unpublish,
            "published": self.published,
            "status": self.status,
        }

    async def start(self, host="127.0.0.1", port=0, *, http_port=None):
        """Serve on ``host:port``; with ``http_port`` (0: any free one) also the status
        page, ``/status.json``, ``/metrics`` and ``/health`` on that host
        (:attr:`dashboard_address`)."""
        await self.listen(host, port)
        self._tasks.spawn(self._monitor(), "watching heartbeats")
        logger.info("center listening at %s (workers drop out after %.1f s of silence)",
                    self.address, self.heartbeat_timeout)
        if http_port is not None:
            self.dashboard = Dashboard(self)
            try:
                await self.dashboard.start(host, http_port)
            except OSError:
                await self.close()
                raise
            logger.info("status page at %s", self.dashboard.address)
        return self.address

    @property
    def dashboard_address(self):
        return self.dashboard.address if self.dashboard is not None else None

    async def close(self, *, grace=0.0):
        if self.dashboard is not None:
            await self.dashboard.close()
        await self._tasks.close()
        await super().close(grace=grace)

    async def _monitor(self):
        """Drop workers silent for ``heartbeat_timeout``, not counting the center's own stalls.

        A center that was stopped (SIGSTOP, a paused VM, a swapped-out process) heard nothing
        while it did not run: that silence is its own, so every worker's clock is moved on by
        the time the loop woke up late.
        """
        period = min(self.heartbeat_interval, self.heartbeat_timeout / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            lag, last = now - last - period, now
            if lag > period:
                logger.warning("the center did not run for %.1f s: not counting that against "
                               "its workers' heartbeats", lag)
                self._last_seen = {a: seen + lag for a, seen in self._last_seen.items()}
                self._clients = {c: seen + lag for c, seen in self._clients.items()}
                self._orphaned = {c: since + lag for c, since in self._orphaned.items()}
            self._check_clients(now, now - self.heartbeat_timeout)
            timeout = self.worker_timeout
            deadline = now - timeout
            for address, seen in list(self._last_seen.items()):
                if seen < deadline:
                    logger.warning("worker %s sent no heartbeat for %.1f s: dropping it and "
                                   "its %d keys", address, timeout,
                                   len(self._has_what.get(address, ())))
                    self._remove_worker(address)

    @property
    def worker_interval(self):
        """Seconds between a worker's heartbeats: longer once there are many workers."""
        return max(self.heartbeat_interval, len(self._ncores) / self.heartbeats_per_second)

    @property
    def worker_timeout(self):
        """A worker's silence before it is dropped: as many intervals as configured."""
        return self.heartbeat_timeout * self.worker_interval / self.heartbeat_interval

    def _check_clients(self, now, deadline):
        """Forget silent clients; free the values of owners without a client for too long."""
        for owner, seen in list(self._clients.items()):
            if seen < deadline:
                logger.info("client %s sent no heartbeat for %.1f s: freeing its values",
                            owner, self.heartbeat_timeout)
                del self._clients[owner]
                self._orphaned[owner] = deadline  # its silence already counts
        for owner in (self._owned.keys() - self._clients.keys() - self._orphaned.keys()
                      - self._released):
            self._orphaned[owner] = now  # keys of a client we never knew (say, we restarted)
        for owner, since in list(self._orphaned.items()):
            if since < deadline:
                self._release_owner(owner)

    def _release_owner(self, owner):
        """Have the workers free the values of an owner whose client is gone (once: they
        tell us as they do). Published values stay (and are freed when unpublished).

        The owner's keys are found by their prefix: one pass over the keys per client that
        went without freeing its values, instead of a set of keys per client kept always.
        """
        self._orphaned.pop(owner, None)
        if not self._owned.get(owner):
            self._owned.pop(owner, None)
            return
        self._released.add(owner)
        kept = set(self._published.values())
        freed = [key for key in self._who_has  # an owner's keys: OWNER-N and OWNER/NAME
                 if key.startswith((owner + "-", owner + "/")) and key not in kept]
        for key in freed:
            for address in self._holders(key):
                self._to_release.setdefault(address, set()).add(key)
        if freed:
            logger.info("freeing %d values of client %s, which is gone", len(freed), owner)

    def _remove_worker(self, address):
        self._to_release.pop(address, None)
        self._discard(address, list(self._has_what.pop(address, {})))
        self._ncores.pop(address, None)
        self._addresses.pop(address, None)
        self._names.pop(address, None)
        self._last_seen.pop(address, None)
        self._metrics.pop(address, None)
        self._rates.forget(address)

    def _discard(self, address, keys):
        held = self._has_what.get(address, {})
        who_has = self._who_has
        gone = []  # keys no worker holds any more
        for key in keys:
            held.pop(key, None)
            holders = who_has.get(key)
            if holders is None:
                continue
            if type(holders) is str:
                if holders != address:
                    continue
            else:
                holders.discard(address)
                if holders:
                    if len(holders) == 1:
                        (who_has[key],) = holders
                    continue
            del who_has[key]
            gone.append(key)
        for owner, its_keys in keys_by_owner(gone).items():
            if owner is not None and owner in self._owned:
                self._owned[owner] -= len(its_keys)
                if self._owned[owner] <= 0:
                    del self._owned[owner]
                    self._released.discard(owner)

    def _holders(self, key):
        """The addresses holding ``key``, as a tuple or a set."""
        holders = self._who_has.get(key, ())
        return (holders,) if type(holders) is str else holders

    def _touch(self, address):
        if address not in self._ncores:
            return False
        self._last_seen[address] = time.monotonic()
        return True

    def register(self, *, address, ncores, name=None, keys=(), nbytes=None):
        check_registration(address, ncores, name)
        check_keys(keys, nbytes)
        if address in self._ncores:
            self._remove_worker(address)  # a restarted worker on the same address
        self._ncores[address] = int(ncores)
        self._addresses[address] = address
        self._names[address] = name or address
        self._has_what[address] = {}
        self._touch(address)
        self.add_keys(address=address, keys=keys, nbytes=nbytes)
        logger.info("registered worker %s with %d cores", address, ncores)
        return {"heartbeat_interval": self.worker_interval}

    def unregister(self, *, address):
        known = address in self._ncores
        if known:
            logger.info("worker %s left with its %d keys", address,
                        len(self._has_what.get(address, ())))
        self._remove_worker(address)
        return {"status": "OK" if known else "unknown-worker"}

    def heartbeat(self, *, address, metrics=None):
        if not self._touch(address):
            return {"status": "unknown-worker"}
        if isinstance(metrics, dict):
            metrics = {part: _numbers(metrics.get(part)) for part in ("counters", "gauges")}
            self._metrics[address] = metrics
            self._rates.update(address, metrics["counters"])
        release = self._to_release.pop(address, None)
        reply = {"heartbeat_interval": self.worker_interval}
        if release:
            reply["release"] = sorted(release)
        return reply

    def add_keys(self, *, address, keys, nbytes=None):
        check_keys(keys, nbytes)
        if not self._touch(address):
            return {"status": "unknown-worker"}
        held = self._has_what[address]
        address = self._addresses[address]  # one string per worker, however many keys
        who_has, owned = self._who_has, self._owned
        sizes = nbytes or {}
        new = []  # keys no worker held before
        for key in keys:
            held[key] = sizes.get(key, -1)
            holders = who_has.get(key)
            if holders is None:
                who_has[key] = address
                new.append(key)
            elif type(holders) is str:
                if holders != address:
                    who_has[key] = {holders, address}
            else:
                holders.add(address)
        for owner, its_keys in keys_by_owner(new).items():
            if owner is not None:
                owned[owner] = owned.get(owner, 0) + len(its_keys)
                if owner in self._released:  # told late: its client is gone already
                    self._to_release.setdefault(address, set()).update(its_keys)
        return {"status": "OK"}

    def remove_keys(self, *, address, keys):
        check_keys(keys)
        self._touch(address)
        self._discard(address, keys)
        return {"status": "OK"}

    def who_has(self, *, keys=None, believed=None):
        """``{key: [address]}`` of ``keys`` (all, by default). ``believed``
        (``{address: [key]}``: where the caller thinks each key lies, alone) adds the
        keys that lie elsewhere instead or as well, and only those: a client freeing
        the results it placed hears of the few copies peers made, not of every key (nor
        of the results not told to us yet: we know of no copy of those)."""
        if keys is None:
            keys = self._who_has if believed is None else ()
        else:
            check_keys(keys)
        who_has = {key: list(self._holders(key)) for key in keys}
        if believed is not None:
            check_believed(believed)
            known = self._who_has
            for address, believed_keys in believed.items():
                for key in believed_keys:
                    holders = known.get(key)
                    if holders is not None and holders != address:  # (one: its address)
                        who_has[key] = list(self._holders(key))
        return {"who_has": who_has}

    def has_what(self, *, workers=None):
        if workers is None:
            workers = self._has_what
        else:
            check_keys(workers)
        return {"has_what": {w: list(self._has_what.get(w, ())) for w in workers}}

    def ncores(self, *, workers=None):
        if workers is None:
            return {"ncores": self._ncores}
        check_keys(workers)
        return {"ncores": {w: self._ncores[w] for w in workers if w in self._ncores}}

    def nbytes(self, *, keys=None):
        if keys is None:
            keys = self._who_has
        else:
            check_keys(keys)
        sizes = {}
        for key in keys:
            for address in self._holders(key):
                size = self._has_what[address].get(key, -1)
                if size >= 0:
                    sizes[key] = size
                    break
        return {"nbytes": sizes}

    # -- clients -----------------------------------------------------------------------------

    def register_client(self, *, client):
        check_owner(client)
        if client not in self._clients:
            logger.info("client %s connected", client)
        self._clients[client] = time.monotonic()
        self._orphaned.pop(client, None)
        self._released.discard(client)  # back: its values are its own again
        return {"heartbeat_interval": self.heartbeat_interval}

    def client_heartbeat(self, *, client):
        if client not in self._clients:
            return {"status": "unknown-client"}
        self._clients[client] = time.monotonic()
        return {}

    def unregister_client(self, *, client):
        """A client that closed: whatever of its values it could not free is freed now."""
        if self._clients.pop(client, None) is not None:
            logger.info("client %s closed", client)
        if client in self._owned:
            self._release_owner(client)

    def publish(self, *, name, key):
        check_publish(name, key)
        if key not in self._who_has:
            raise ValueError(f"no worker holds {key!r}: there is nothing to publish")
        if self._published.get(name, key) != key:
            raise ValueError(f"the name {name!r} is published already (for another value): "
                             "unpublish it first")
        self._published[name] = key
        return {}

    def unpublish(self, *, name):
        key = self._published.pop(name, None)
        if key is None:
            return {"status": "unknown-name"}
        owner = owner_of(key)
        if owner is not None and owner not in self._clients:  # nobody else will free it
            for address in self._holders(key):
                self._to_release.setdefault(address, set()).add(key)
        return {"key": key}

    def published(self, *, name=None):
        if name is None:
            return {"published": self._published}
        if name not in self._published:
            return {"status": "unknown-name"}
        return {"key": self._published[name]}

    def identity(self):
        return {"role": "center", "address": self.address, "nworkers": len(self._ncores)}

    def workers(self):
        now = time.monotonic()
        return {"workers": {
            address: {"ncores": n, "name": self._names[address],
                      "nkeys": len(self._has_what[address]),
                      "last_seen": now - self._last_seen[address]}
            for address, n in self._ncores.items()}}

    def status(self):
        """The cluster as the center sees it: each worker (its identity, keys, last
        heartbeat, the totals and gauges it sent and their rates per second) and totals.
        What ``/status.json``, ``d3arrow status`` and ``Pool.status()`` show."""
        now = time.monotonic()
        workers = []
        for address, ncores in self._ncores.items():
            metrics = self._metrics.get(address, {})
            workers.append({
                "address": address, "name": self._names[address], "ncores": ncores,
                "nkeys": len(self._has_what[address]),
                "last_seen": now - self._last_seen[address],
                "counters": metrics.get("counters", {}), "gauges": metrics.get("gauges", {}),
                "rates": self._rates.rates.get(address, {})})
        totals = {"workers": len(workers), "ncores": sum(self._ncores.values()),
                  "keys": len(self._who_has), "clients": len(self._clients),
                  **totals_of(workers)}
        return {"center": self.address, "uptime": time.time() - self.started,
                "heartbeat_interval": self.heartbeat_interval, "workers": workers,
                "totals": totals, "requests": dict(self.requests)}


def _numbers(part):
    """Only ``{str: number}`` of a worker's metrics is kept: they are shown and exported."""
    if not isinstance(part, dict):
        return {}
    return {k: v for k, v in part.items() if isinstance(k, str) and type(v) in (int, float, bool)}

