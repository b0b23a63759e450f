"""Servers that dispatch ``{"op": ...}`` messages, and the client side: a connection pool.

A server lists its handlers explicitly (``self.handlers = {"who_has": self.who_has}``).
A handler takes the message fields as keyword-only arguments and returns the reply header;
``"status": "OK"`` is added when it names none. A handler that raises produces an
``"error"`` reply with the exception's type, message, traceback text and (when it pickles)
the exception itself; the connection stays open. The caller re-raises it with
:func:`raise_for_error`, the remote traceback attached as ``__cause__``.
"""

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import time
import traceback
import types

from .comm import CONNECT_TIMEOUT, Listener, connect, stall_timeout
from .protocol import allocate_buffers
from .security import NO_SECURITY
from . import errors
from .errors import (CommClosedError, PeerUnresponsiveError, ProtocolError, RemoteError,
                     RemoteExit, RemoteTraceback)
from .serialize import Serialized, deserialize, serialize

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds, for control requests that do no user computation
DRAIN_POLL_SECONDS = 0.02
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats (the center may say otherwise)
PEER_TIMEOUT_ENV = "D3ARROW_PEER_TIMEOUT"


def peer_timeout():
    """Seconds a worker waits on a silent peer before it tries another holder (default 10:
    a peer silent that long is as good as dead, like a worker that missed its heartbeats)."""
    return float(os.environ.get(PEER_TIMEOUT_ENV) or 10.0)


def error_reply(exc):
    """The reply header for an exception raised while handling a request."""
    reply = {
        "status": "error",
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    try:
        reply["exception"] = serialize(exc)
    except Exception:
        pass  # the type name, message and traceback text still travel
    return reply


def rebuild_error(reply):
    """The exception an ``"error"`` reply describes, ready to raise."""
    remote_tb = reply.get("traceback") or ""
    exc = None
    if isinstance(reply.get("exception"), Serialized):
        try:
            exc = deserialize(reply["exception"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = _our_error(reply)
    if not isinstance(exc, BaseException) or isinstance(exc, CommClosedError):
        # the peer's own transport trouble (say, it could not reach the center) is not
        # ours with the peer: only a CommClosedError raised here may blame the peer
        exc = RemoteError(reply.get("type", "Exception"), reply.get("message", ""), remote_tb)
    exc.__cause__ = RemoteTraceback(remote_tb)
    if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt: see RemoteExit
        return RemoteExit(exc)
    return exc


def _our_error(reply):
    """A d3arrow error named by an unpickled reply (say, a refusal before any handshake)."""
    module, _, name = str(reply.get("type", "")).rpartition(".")
    exc_type = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(exc_type, type) and issubclass(exc_type, errors.D3ArrowError):
        try:
            return exc_type(reply.get("message", ""))
        except TypeError:
            return None
    return None


def raise_for_error(reply):
    if reply.get("status") == "error":
        raise rebuild_error(reply)
    return reply


class Server:
    """Base of the center and the worker: a listener and op dispatch.

    Subclasses set ``self.handlers`` (op name -> method) before ``listen``.
    """

    handlers = {}

    def __init__(self, *, allocate=allocate_buffers, security=NO_SECURITY, stay_awake=None):
        self.security = security
        self._stay_awake = stay_awake  # a StayAwake, poked after replies that ask for it
        self.listener = Listener(self.handle_comm, allocate=allocate, security=security)
        self.address = None
        self.draining = False
        self._waiting = set()  # connections waiting for their next request
        self._in_flight = 0  # requests being handled
        self._reply_silence = stall_timeout()
        self.connections = 0  # open to us now
        self.requests = collections.Counter()  # op -> requests handled (known ops only)

    async def listen(self, host="127.0.0.1", port=0, *, local=False):
        """Listen on ``host:port`` (and with ``local`` on a Unix socket: see Listener)."""
        self.address = await self.listener.start(host, port, local=local)
        return self.address

    async def handle_comm(self, comm):
        self.connections += 1
        try:
            while not self.draining:
                self._waiting.add(comm)
                try:
                    msg = await comm.recv()
                finally:
                    self._waiting.discard(comm)
                self._in_flight += 1
                try:
                    # a caller in its own thread sends its next request at once: see StayAwake
                    awake = type(msg) is dict and msg.pop("stay_awake", False)
                    op = msg.get("op") if type(msg) is dict else None
                    reply = await self.handle_message(msg)
                    try:  # a requester that stops reading our reply is gone too
                        await comm.send(reply, silence=self._reply_silence)
                        if awake is not False and self._stay_awake is not None:
                            self._stay_awake.poke(awake if type(awake) is int else -1)
                    except CommClosedError:
                        await self.undelivered(op, msg, reply)
                        raise
                finally:
                    self._in_flight -= 1
        finally:
            self.connections -= 1

    async def undelivered(self, op, request, reply):
        """Called with a request (its ``op`` taken out) whose requester hung up before
        its reply reached it (it gave up, or died)."""

    async def handle_message(self, msg):
        if isinstance(msg, ProtocolError):
            return error_reply(msg)
        op = msg.pop("op", None)
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return error_reply(ProtocolError(
                f"unknown operation {op!r}; this server knows {sorted(self.handlers)}"))
        self.requests[op] += 1
        try:
            reply = handler(**msg)
            if type(reply) is types.CoroutineType or inspect.isawaitable(reply):
                reply = await reply
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # also SystemExit from user code: the caller's error
            logger.debug("%s failed", op, exc_info=True)
            return error_reply(e)
        if reply is None:
            return {"status": "OK"}
        reply.setdefault("status", "OK")
        return reply

    async def drain(self, grace):
        """Take no more requests; give those being handled ``grace`` seconds to reply."""
        self.draining = True
        self.listener.stop_accepting()
        for comm in list(self._waiting):  # the requester sees a closed connection, retries
            comm.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._in_flight and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if self._in_flight:
            logger.warning("closing with %d requests unanswered after %.1f s", self._in_flight,
                           grace)

    async def close(self, *, grace=0.0):
        """Stop serving; with ``grace``, let requests being handled finish first."""
        if grace:
            await self.drain(grace)
        await self.listener.stop()


@contextlib.asynccontextmanager
async def time_limit(seconds, what, *, stated=None):
    """``asyncio.timeout(seconds)`` whose TimeoutError says what was not done in time
    (within ``stated`` seconds: the caller's whole timeout, of which these are what is left)."""
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            yield
    except TimeoutError:
        if limit.expired():
            shown = seconds if stated is None else stated
            raise TimeoutError(f"{what} not done within {shown:g} s") from None
        raise


def log_failure(what):
    """A done-callback for a background task that nobody awaits: log why it failed."""
    def callback(task):
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %s", what, task.exception())
    return callback


class Tasks:
    """The background tasks of one server or client: it cancels them all on close.

    A task that fails is logged (nobody awaits it); one that finishes is forgotten.
    """

    def __init__(self):
        self._tasks = set()

    def spawn(self, coro, what):
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_failure(what))
        return task

    async def close(self):
        """Cancel every task and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RecentFailures:
    """Addresses that failed us lately: they may have died, so leave them out for a while.

    Forgotten after ``seconds``, by when the center has dropped a dead worker anyway.
    """

    def __init__(self, seconds=30.0):
        self.seconds = seconds
        self._when = {}  # address -> time.monotonic() it failed

    def add(self, address):
        self._when[address] = time.monotonic()

    def __bool__(self):
        """Whether any address failed lately (or did so before and was not yet forgotten)."""
        return bool(self._when)

    def recent(self):
        if not self._when:  # the usual case, asked at every placement
            return []
        now = time.monotonic()
        self._when = {a: t for a, t in self._when.items() if now - t <= self.seconds}
        return sorted(self._when)

    def without(self, addresses):
        """``addresses`` less the recent failures, in order."""
        if not self._when:
            return list(addresses)
        failed = set(self.recent())
        return [a for a in addresses if a not in failed]


class ConnectionPool:
    """Reusable connections per address, so requests do not pay a TCP handshake.

    ``await pool.rpc(address).who_has(keys=[...])`` sends ``{"op": "who_has", "keys": [...]}``
    on an idle connection (or a new one) and returns the reply header, raising for
    ``"error"`` replies.
    """

    def __init__(self, *, connect_timeout=CONNECT_TIMEOUT, max_idle_per_address=32,
                 allocate=allocate_buffers, security=NO_SECURITY, on_failure=None):
        self._idle = collections.defaultdict(list)
        self._allocate = allocate
        self._security = security
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_address
        self._busy = {}  # comm -> address, while a request uses it
        self._on_failure = on_failure  # told of every address whose transport failed us
        self.closed = False

    async def acquire(self, address, *, timeout=None):
        """An idle connection to ``address``, or a new one; ``timeout`` bounds the new
        one's handshake below the pool's connect timeout (a frozen peer's kernel accepts
        the connection, and then the peer says nothing)."""
        idle = self._idle[address]
        while idle:
            comm = idle.pop()
            if not comm.closed:
                self._busy[comm] = address
                return comm
        if self.closed:
            raise CommClosedError("connection pool is closed")
        if timeout is None or timeout > self._connect_timeout:
            timeout = self._connect_timeout
        comm = await connect(address, timeout=timeout, allocate=self._allocate,
                             security=self._security)
        self._busy[comm] = address
        return comm

    def release(self, address, comm):
        self._busy.pop(comm, None)
        if comm.closed or self.closed or len(self._idle[address]) >= self._max_idle:
            comm.abort()
        else:
            self._idle[address].append(comm)

    async def request(self, address, msg, *, timeout=None, on_sent=None):
        """Send ``msg`` to ``address`` and return the reply header (errors raised).

        ``timeout`` bounds the peer's silence, not the whole request: a peer that takes or
        sends no bytes for that long raises PeerUnresponsiveError, while a large reply that
        keeps arriving is never cut off. ``on_sent()`` is called once the message is
        written, before the reply arrives. Failures of the transport to this peer raise
        CommClosedError (and only they do), and only they are told to ``on_failure``: errors
        the peer reports raise as their own type.
        """
        try:
            comm = await self.acquire(address, timeout=timeout)
        except CommClosedError:
            self._failed(address)
            raise
        try:
            await comm.send(msg, silence=timeout)
            if on_sent is not None:
                on_sent()
            reply = await comm.recv(silence=timeout)
        except BaseException as e:
            comm.abort()  # its state is unknown: a late reply must not reach the next request
            self._busy.pop(comm, None)
            early = comm.early_reply() if isinstance(e, CommClosedError) else None
            if isinstance(early, dict) and early.get("status") == "error":
                raise rebuild_error(early) from None  # it refused our message, and said why
            if isinstance(e, OSError):
                self._failed(address)
            if isinstance(e, PeerUnresponsiveError):
                raise PeerUnresponsiveError(f"{e} (a request {msg.get('op')!r})") from None
            if isinstance(e, OSError) and not isinstance(e, CommClosedError):
                raise CommClosedError(f"connection to {address} failed: {e}") from e
            raise
        self.release(address, comm)
        if isinstance(reply, ProtocolError):
            raise reply
        return raise_for_error(reply)

    def _failed(self, address):
        if self._on_failure is not None:
            self._on_failure(address)

    def busy_addresses(self):
        """Addresses with a request awaiting its reply."""
        return set(self._busy.values())

    def abort(self, address):
        """Break off every request to ``address``: each raises CommClosedError."""
        for comm, to in list(self._busy.items()):
            if to == address:
                comm.abort()

    def rpc(self, address, *, timeout=None):
        return _RPC(self, address, timeout)

    def close(self):
        self.closed = True
        for comms in self._idle.values():
            for comm in comms:
                comm.abort()
        self._idle.clear()
        for comm in list(self._busy):
            comm.abort()


class _RPC:
    def __init__(self, pool, address, timeout):
        self._pool, self._address, self._timeout = pool, address, timeout

    def __getattr__(self, op):
        async def send_recv(**fields):
            return await self._pool.request(self._address, {"op": op, **fields},
                                             timeout=self._timeout)
        return send_recv
