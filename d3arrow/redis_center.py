"""The center's ops on a Redis server: the seed's "the center could be replaced by Redis".

:class:`RedisCenter` has a coroutine per center op (``who_has``, ``add_keys``,
``heartbeat``, ...) taking the same arguments and returning the same reply dicts as
:class:`d3arrow.center.Center`, so the client and the worker use it where they would use
an rpc to a center (see :mod:`d3arrow.metadata`). There is no center process: what the
center does on its own happens in the callers.

- Liveness: a worker's (and a client's) heartbeat renews a key that expires after the
  heartbeat timeout. Readers see only live workers (``ncores``, ``who_has``). Every
  ``SWEEP_EVERY`` heartbeats a worker asks which of its own values belong to clients that
  are gone (and are not published): they come back as ``release`` in the heartbeat's reply,
  as the center's would; and about ``DEAD_SWEEPS`` times per interval, over the whole
  cluster, one of them drops the registrations (and key entries) of dead workers.
- Order: each caller's updates go through one connection, one at a time.
- Settings: ``heartbeat_interval`` and ``heartbeat_timeout`` live in the database
  (:func:`configure`); defaults as the center's.

Layout, under the prefix ``d3arrow:`` of the URL's database: ``workers`` {address: ncores},
``names`` {address: name}, ``alive:ADDRESS`` and ``client:OWNER`` (expiring),
``metrics:ADDRESS`` (JSON, expiring), ``owners:ADDRESS`` {owner: keys held}, ``who_has:KEY`` (its holders' addresses, joined by
commas: a batch of 1,000 is one MGET; changed by the Lua scripts below, one call per batch),
``has_what:ADDRESS`` {key: nbytes}, ``published`` {name: key}, ``config``.
"""

import asyncio
import json
import logging
import random

from .checks import check_believed, check_keys, check_owner, check_publish, check_registration
from .errors import CommClosedError
from .keys import owner_of
from .metrics import totals_of

logger = logging.getLogger(__name__)

PREFIX = "d3arrow:"
DEFAULTS = {"heartbeat_interval": 1.0, "heartbeat_timeout": 10.0}  # as the center's
SWEEP_EVERY = 5  # heartbeats of a worker between its looks for values of gone clients
DEAD_SWEEPS = 2  # looks for dead workers per heartbeat interval, over the whole cluster
SCHEMES = ("redis://", "rediss://", "unix://")


# a key's owner, as d3arrow.keys.owner_of reads it: 16 hex digits, then '-' or '/'
_SPLIT = """
local function split(text)  -- the keys (or sizes), joined by NUL bytes: one argument
  local parts = {}
  for part in string.gmatch(text, '[^%z]+') do parts[#parts + 1] = part end
  return parts
end
local function owner_of(key)  -- as d3arrow.keys.owner_of: 16 hex digits, then - or /
  return string.match(key, '^(' .. string.rep('%x', 16) .. ')[-/]')
end
local prefix, address = ARGV[1], ARGV[2]
local has_what, owned = prefix .. 'has_what:' .. address, prefix .. 'owners:' .. address
local keys = split(ARGV[3])
"""
# ARGV: prefix, address, keys, sizes (NUL-joined): the address holds these keys
# (-1, nothing done: no such worker is registered)
_ADD_HOLDER = _SPLIT + """
if redis.call('HEXISTS', prefix .. 'workers', address) == 0 then return -1 end
local sizes = split(ARGV[4])
local owners = {}
for i, key in ipairs(keys) do
  if redis.call('HSET', has_what, key, sizes[i]) == 1 then
    local owner = owner_of(key)
    if owner then owners[owner] = (owners[owner] or 0) + 1 end
  end
  local name = prefix .. 'who_has:' .. key
  if not redis.call('SET', name, address, 'NX') then
    local held = redis.call('GET', name)
    if string.find(',' .. held .. ',', ',' .. address .. ',', 1, true) == nil then
      redis.call('SET', name, held .. ',' .. address)
    end
  end
end
for owner, n in pairs(owners) do redis.call('HINCRBY', owned, owner, n) end
return 0
"""
# ARGV: prefix, address, keys (NUL-joined): the address no longer holds these keys
_DROP_HOLDER = _SPLIT + """
local owners = {}
for _, key in ipairs(keys) do
  if redis.call('HDEL', has_what, key) == 1 then
    local owner = owner_of(key)
    if owner then owners[owner] = (owners[owner] or 0) + 1 end
  end
  local name = prefix .. 'who_has:' .. key
  local held = redis.call('GET', name)
  if held then
    local kept = {}
    for holder in string.gmatch(held, '[^,]+') do
      if holder ~= address then table.insert(kept, holder) end
    end
    if #kept == 0 then redis.call('DEL', name)
    else redis.call('SET', name, table.concat(kept, ',')) end
  end
end
for owner, n in pairs(owners) do
  if redis.call('HINCRBY', owned, owner, -n) <= 0 then redis.call('HDEL', owned, owner) end
end
return 0
"""
BATCH = 1000  # keys per script call


def is_redis(address) -> bool:
    return isinstance(address, str) and address.startswith(SCHEMES)


def configure(url, **settings):
    """Store cluster settings (``heartbeat_interval``, ``heartbeat_timeout``) in the
    database, for the workers and clients that use it (blocking; before they start)."""
    import redis

    unknown = settings.keys() - DEFAULTS.keys()
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    with redis.Redis.from_url(url) as server:
        if settings:
            server.hset(PREFIX + "config", mapping={k: float(v) for k, v in settings.items()})


class RedisCenter:
    """The center's ops, answered by the Redis server at ``url`` (one per event loop)."""

    def __init__(self, url):
        try:
            import redis.asyncio
        except ImportError:
            raise ImportError("a redis:// center needs the redis package: pip install "
                              "'d3arrow[redis]'") from None
        self.url = url
        self._redis = redis.asyncio.Redis.from_url(url, decode_responses=True,
                                                   socket_connect_timeout=5,
                                                   socket_timeout=30)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError)
        self._auth_error = redis.exceptions.AuthenticationError
        self._response_error = redis.exceptions.ResponseError
        self._updates = asyncio.Lock()  # one update at a time: they apply in call order
        self._add_holder = self._redis.register_script(_ADD_HOLDER)
        self._drop_holder = self._redis.register_script(_DROP_HOLDER)
        self._beats = 0
        self._config = None

    def __repr__(self):
        return f"<RedisCenter {shown(self.url)}>"

    async def _call(self, coroutine):
        try:
            return await coroutine
        except self._auth_error as e:
            raise CommClosedError(f"Redis at {shown(self.url)} refused us: {e}") from None
        except self._errors as e:
            raise CommClosedError(f"cannot reach Redis at {shown(self.url)}: {e}") from None
        except self._response_error as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                raise CommClosedError(f"Redis at {shown(self.url)} refused us: {e}") from None
            raise

    async def _settings(self):
        if self._config is None:
            stored = await self._call(self._redis.hgetall(PREFIX + "config"))
            self._config = {k: float(stored.get(k, v)) for k, v in DEFAULTS.items()}
        return self._config

    async def _timeout_ms(self):
        return int((await self._settings())["heartbeat_timeout"] * 1000)

    async def _scan(self, pattern):
        return [k async for k in self._redis.scan_iter(match=pattern, count=1000)]

    async def _live(self, addresses):
        """The addresses among these whose heartbeat has not expired."""
        addresses = list(addresses)
        if not addresses:
            return []
        alive = await self._call(self._redis.mget([PREFIX + "alive:" + a for a in addresses]))
        return [a for a, flag in zip(addresses, alive) if flag is not None]

    # -- workers -----------------------------------------------------------------------------

    async def identity(self):
        await self._call(self._redis.ping())
        workers = await self._call(self._redis.hkeys(PREFIX + "workers"))
        return {"role": "center", "backend": "redis", "address": shown(self.url),
                "nworkers": len(await self._live(workers))}

    async def register(self, *, address, ncores, name=None, keys=(), nbytes=None):
        check_registration(address, ncores, name)
        _check_keys(keys)
        await self._remove_worker(address)  # a restarted worker on the same address
        pipe = self._redis.pipeline()
        pipe.hset(PREFIX + "workers", address, ncores)
        pipe.hset(PREFIX + "names", address, name or address)
        pipe.set(PREFIX + "alive:" + address, 1, px=await self._timeout_ms())
        await self._call(pipe.execute())
        await self.add_keys(address=address, keys=list(keys), nbytes=nbytes)
        logger.info("registered worker %s with %d cores in %s", address, ncores, self)
        return {"heartbeat_interval": (await self._settings())["heartbeat_interval"]}

    async def unregister(self, *, address):
        known = await self._call(self._redis.hexists(PREFIX + "workers", address))
        await self._remove_worker(address)
        return {"status": "OK" if known else "unknown-worker"}

    async def _holders_change(self, script, address, keys, sizes=None):
        """Run ``script`` over ``keys`` (and their ``sizes``), BATCH keys per call, each
        list passed as one NUL-joined argument (cheap to send, split by Lua); False if a
        call found the worker unregistered."""
        for start in range(0, len(keys), BATCH):
            args = [PREFIX, address, "\0".join(keys[start:start + BATCH])]
            if sizes is not None:
                args.append("\0".join(map(str, sizes[start:start + BATCH])))
            if await self._call(script(args=args)) == -1:
                return False
        return True

    async def _remove_worker(self, address):
        keys = await self._call(self._redis.hkeys(PREFIX + "has_what:" + address))
        await self._holders_change(self._drop_holder, address, keys)
        pipe = self._redis.pipeline()
        for table in ("workers", "names"):
            pipe.hdel(PREFIX + table, address)
        pipe.delete(PREFIX + "has_what:" + address, PREFIX + "alive:" + address,
                    PREFIX + "metrics:" + address, PREFIX + "owners:" + address)
        await self._call(pipe.execute())

    async def heartbeat(self, *, address, metrics=None):
        timeout_ms = await self._timeout_ms()
        pipe = self._redis.pipeline()  # one round trip (an unknown worker's keys expire)
        pipe.hexists(PREFIX + "workers", address)
        pipe.set(PREFIX + "alive:" + address, 1, px=timeout_ms)
        if isinstance(metrics, dict):
            pipe.set(PREFIX + "metrics:" + address, json.dumps(metrics), px=timeout_ms)
        if not (await self._call(pipe.execute()))[0]:
            return {"status": "unknown-worker"}
        reply = {"heartbeat_interval": (await self._settings())["heartbeat_interval"]}
        self._beats += 1
        if self._beats % SWEEP_EVERY == 0:
            release = await self._values_of_gone_clients(address)
            if release:
                reply["release"] = release
            # the dead are looked for ~DEAD_SWEEPS times per interval, however many beat
            registered = await self._call(self._redis.hlen(PREFIX + "workers"))
            if random.random() * registered < DEAD_SWEEPS * SWEEP_EVERY:
                await self._drop_dead_workers()
        return reply

    async def _drop_dead_workers(self):
        registered = await self._call(self._redis.hkeys(PREFIX + "workers"))
        live = set(await self._live(registered))
        for address in registered:
            if address not in live:
                logger.warning("worker %s sent no heartbeat in time: dropping it and its keys "
                               "from %s", address, self)
                await self._remove_worker(address)

    async def _values_of_gone_clients(self, address):
        """Keys this worker holds whose client is gone, published ones excepted (the
        owners of its keys are counted as they come and go: a look costs per owner, and
        per key only when one is gone)."""
        owners = await self._call(self._redis.hkeys(PREFIX + "owners:" + address))
        if not owners:
            return []
        alive = await self._call(self._redis.mget([PREFIX + "client:" + o for o in owners]))
        gone = {o for o, flag in zip(owners, alive) if flag is None}
        if not gone:
            return []
        keys = await self._call(self._redis.hkeys(PREFIX + "has_what:" + address))
        published = set(await self._call(self._redis.hvals(PREFIX + "published")))
        return sorted(k for k in keys if owner_of(k) in gone and k not in published)

    # -- keys --------------------------------------------------------------------------------

    async def add_keys(self, *, address, keys, nbytes=None):
        _check_keys(keys, nbytes)
        if not keys:
            known = await self._call(self._redis.hexists(PREFIX + "workers", address))
            return {"status": "OK" if known else "unknown-worker"}
        sizes = nbytes or {}
        async with self._updates:
            known = await self._holders_change(self._add_holder, address, list(keys),
                                               [sizes.get(key, -1) for key in keys])
        return {"status": "OK" if known else "unknown-worker"}

    async def remove_keys(self, *, address, keys):
        _check_keys(keys)
        if not keys:
            return {"status": "OK"}
        async with self._updates:
            await self._holders_change(self._drop_holder, address, list(keys))
        return {"status": "OK"}

    async def who_has(self, *, keys=None, believed=None):
        """As :meth:`d3arrow.center.Center.who_has`."""
        if believed is not None:
            check_believed(believed)
            asked = (await self.who_has(keys=keys or []))["who_has"]
            believed_in = {key: address for address, ks in believed.items() for key in ks}
            held = (await self.who_has(keys=list(believed_in)))["who_has"]
            return {"who_has": {**asked, **{k: h for k, h in held.items()
                                           if h and h != [believed_in[k]]}}}
        if keys is None:
            keys = [k.removeprefix(PREFIX + "who_has:")
                    for k in await self._call(self._scan(PREFIX + "who_has:*"))]
        _check_keys(keys)
        if not keys:
            return {"who_has": {}}
        held = await self._call(self._redis.mget([PREFIX + "who_has:" + k for k in keys]))
        holders = [h.split(",") if h else [] for h in held]
        live = set(await self._live({a for h in holders for a in h}))
        return {"who_has": {k: [a for a in h if a in live] for k, h in zip(keys, holders)}}

    async def has_what(self, *, workers=None):
        if workers is None:
            workers = (await self.ncores())["ncores"]
        _check_keys(list(workers))
        pipe = self._redis.pipeline(transaction=False)
        for w in workers:
            pipe.hkeys(PREFIX + "has_what:" + w)
        return {"has_what": dict(zip(workers, await self._call(pipe.execute())))}

    async def ncores(self, *, workers=None):
        registered = await self._call(self._redis.hgetall(PREFIX + "workers"))
        live = await self._live(registered)
        if workers is not None:
            asked = set(workers)
            live = [w for w in live if w in asked]
        return {"ncores": {w: int(registered[w]) for w in live}}

    async def nbytes(self, *, keys=None):
        held = (await self.who_has(keys=keys))["who_has"]
        pipe = self._redis.pipeline(transaction=False)
        asked = [(k, h[0]) for k, h in held.items() if h]
        for key, holder in asked:
            pipe.hget(PREFIX + "has_what:" + holder, key)
        sizes = await self._call(pipe.execute())
        return {"nbytes": {k: int(s) for (k, _), s in zip(asked, sizes)
                           if s is not None and int(s) >= 0}}

    async def workers(self):
        registered = await self._call(self._redis.hgetall(PREFIX + "workers"))
        live = await self._live(registered)
        timeout_ms = await self._timeout_ms()
        pipe = self._redis.pipeline(transaction=False)
        for w in live:
            pipe.hget(PREFIX + "names", w)
            pipe.hlen(PREFIX + "has_what:" + w)
            pipe.pttl(PREFIX + "alive:" + w)
        found = await self._call(pipe.execute())
        return {"workers": {
            w: {"ncores": int(registered[w]), "name": found[3 * i] or w,
                "nkeys": found[3 * i + 1],
                "last_seen": max(0.0, (timeout_ms - max(found[3 * i + 2], 0)) / 1000)}
            for i, w in enumerate(live)}}

    async def status(self):
        workers = (await self.workers())["workers"]
        metrics = await self._call(self._redis.mget(
            [PREFIX + "metrics:" + w for w in workers])) if workers else []
        out = []
        for (address, info), raw in zip(workers.items(), metrics):
            sent = json.loads(raw) if raw else {}
            out.append({"address": address, **info, "counters": sent.get("counters", {}),
                        "gauges": sent.get("gauges", {}), "rates": {}})
        settings = await self._settings()
        clients = await self._call(self._scan(PREFIX + "client:*"))
        server = await self._call(self._redis.info("server"))
        return {"center": shown(self.url), "backend": "redis",
                "uptime": server.get("uptime_in_seconds", 0),
                "heartbeat_interval": settings["heartbeat_interval"], "workers": out,
                "totals": {"workers": len(out), "ncores": sum(w["ncores"] for w in out),
                           # keys held, a key held twice counted twice (no count is kept)
                           "keys": sum(w["nkeys"] for w in out), "clients": len(clients),
                           **totals_of(out)},
                "requests": {}}

    # -- clients -----------------------------------------------------------------------------

    async def register_client(self, *, client):
        check_owner(client)
        await self._call(self._redis.set(PREFIX + "client:" + client, 1,
                                         px=await self._timeout_ms()))
        return {"heartbeat_interval": (await self._settings())["heartbeat_interval"]}

    async def client_heartbeat(self, *, client):
        renewed = await self._call(self._redis.set(PREFIX + "client:" + client, 1,
                                                   px=await self._timeout_ms(), xx=True))
        return {} if renewed else {"status": "unknown-client"}

    async def unregister_client(self, *, client):
        """Its values not freed yet go with the workers' next look for gone clients."""
        await self._call(self._redis.delete(PREFIX + "client:" + client))
        return {}

    async def publish(self, *, name, key):
        check_publish(name, key)
        if not (await self.who_has(keys=[key]))["who_has"][key]:
            raise ValueError(f"no worker holds {key!r}: there is nothing to publish")
        current = await self._call(self._redis.hget(PREFIX + "published", name))
        if current not in (None, key):
            raise ValueError(f"the name {name!r} is published already (for another value): "
                             "unpublish it first")
        await self._call(self._redis.hset(PREFIX + "published", name, key))
        return {}

    async def unpublish(self, *, name):
        key = await self._call(self._redis.hget(PREFIX + "published", name))
        if key is None:
            return {"status": "unknown-name"}
        await self._call(self._redis.hdel(PREFIX + "published", name))
        return {"key": key}

    async def published(self, *, name=None):
        if name is None:
            return {"published": await self._call(self._redis.hgetall(PREFIX + "published"))}
        key = await self._call(self._redis.hget(PREFIX + "published", name))
        return {"status": "unknown-name"} if key is None else {"key": key}

    async def close(self):
        await self._redis.aclose()


def _check_keys(keys, nbytes=None):
    """The center's rule (:func:`d3arrow.checks.check_keys`), and the scripts' separator."""
    check_keys(keys, nbytes)
    if any(not k or "\0" in k for k in keys):  # the scripts' separator
        raise ValueError("keys kept in Redis are non-empty and hold no NUL character, got "
                         f"{[k for k in keys if not k or chr(0) in k][:3]!r}")


def shown(url):
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
