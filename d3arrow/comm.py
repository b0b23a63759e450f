"""Framed connections over TCP on the running event loop (uvloop in every d3arrow process).
A server may also listen on an abstract Unix socket, for callers on its host that ask.

A :class:`Comm` sends and receives whole messages (see :mod:`d3arrow.protocol`). Receiving
goes through an ``asyncio.BufferedProtocol`` so the kernel writes payload bytes straight
into the buffers the values will live in; sending hands the payload pieces to
``transport.writelines`` as they are, and ``send`` waits while the transport is over its
high-water mark, so bytes in flight stay bounded.
"""

import asyncio
import collections
import logging
import os
import socket
import time
import uuid
import weakref

from . import security
from .addressing import format_address, parse_address
from .errors import AuthenticationError, CommClosedError, PeerUnresponsiveError, ProtocolError
from .protocol import MessageReader, allocate_buffers, dumps
from .security import NO_SECURITY

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
MAX_QUEUED_MESSAGES = 16  # received but not yet taken by recv(): stop reading beyond this
SCRATCH_AFTER_REFUSAL = 4096
HANG_UP_SECONDS = 2.0  # after our last words, how long the peer has to hang up itself
STALL_ENV = "D3ARROW_STALL_TIMEOUT"


def stall_timeout():
    """Seconds a server lets a connection sit mid-message (or before its first message)
    without a byte before closing it (default 30): a stalled peer holds no memory for long."""
    return float(os.environ.get(STALL_ENV) or 30.0)


class _FramedProtocol(asyncio.BufferedProtocol):
    """Messages over one connection; with a token, only after the handshake succeeded.

    ``ready`` resolves once the connection may carry messages (at once without a token),
    or fails with the reason it may not. A server hands the connection on only then.
    """

    def __init__(self, on_connect=None, allocate=allocate_buffers, token=None,
                 server_side=False):
        self._reader = MessageReader(allocate=allocate)
        self._on_connect = on_connect
        self._token = token
        self._server_side = server_side
        self._handshake = None  # (buffer, filled, step) while the handshake reads bytes
        self._handshake_timer = None
        self._nonces = {}
        self.ready = asyncio.get_running_loop().create_future()
        self._inbox = collections.deque()
        self._waiter = []  # futures of those waiting for a message (each their own)
        self._drain_waiter = []  # ... for the transport's buffer to drain
        self._paused_writing = False
        self._paused_reading = False
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self.comm = None
        self.failure = None  # why we hung up, when the peer's bytes made no sense
        self.last_heard = time.monotonic()  # the peer's last bytes (or drain) arrived then
        self._stall_timer = None
        self._heard_a_message = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.comm = Comm(self)
        if self._server_side:
            self._stall_seconds = stall_timeout()
            self._check_stall()
        if self._token is None:
            self._become_ready()
        elif self._server_side:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                security.HANDSHAKE_TIMEOUT, self._refuse,
                f"no token handshake within {security.HANDSHAKE_TIMEOUT} s")
            self._expect(len(security.MAGIC), self._on_magic)
        else:
            self._nonces["client"] = security.new_nonce()
            transport.write(security.hello(self._nonces["client"]))
            self._expect(security.CHALLENGE_BYTES, self._on_challenge)

    # -- the token handshake (see d3arrow.security) -------------------------------------------

    def _expect(self, nbytes, step):
        self._handshake = (bytearray(nbytes), 0, step)

    def _on_magic(self, data):
        if data != security.MAGIC:  # a peer without a token: tell it, in a frame it reads
            self._refuse("this server requires an auth token (--auth-token or "
                         f"${security.TOKEN_ENV})", frame=True)
            return
        self._expect(security.NONCE_BYTES, self._on_hello)

    def _on_hello(self, data):
        self._nonces["client"] = bytes(data)
        self._nonces["server"] = security.new_nonce()
        self.transport.write(security.challenge(self._token, self._nonces["client"],
                                                self._nonces["server"]))
        self._expect(security.PROOF_BYTES, self._on_proof)

    def _on_proof(self, data):
        if not security.check_proof(self._token, data, self._nonces["client"],
                                    self._nonces["server"]):
            self.transport.write(security.REFUSED)
            self._refuse("wrong auth token")
            return
        self.transport.write(security.ACCEPTED)
        self._become_ready()

    def _on_challenge(self, data):
        try:
            server_nonce = security.check_challenge(self._token, data, self._nonces["client"])
        except AuthenticationError as e:
            self._fail(e)
            return
        self.transport.write(security.proof(self._token, b"client", server_nonce,
                                            self._nonces["client"]))
        self._expect(1, self._on_verdict)

    def _on_verdict(self, data):
        if data != security.ACCEPTED:
            self._fail(AuthenticationError("the server refused this connection's auth token"))
            return
        self._become_ready()

    def _refuse(self, reason, *, frame=False):
        """Server side: turn the connection away (with an error reply if ``frame``)."""
        peer = self.comm.peer_address if self.comm else "unknown"
        logger.warning("refused connection from %s: %s", peer, reason)
        if frame:
            self.transport.writelines(dumps(_error_frame(AuthenticationError(reason))))
        self._fail(AuthenticationError(reason))

    def _fail(self, exc):
        self._handshake = None
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved here: a refused peer has no one to tell
        if self._server_side:
            self._hang_up()
        else:
            self.transport.abort()

    def _hang_up(self):
        """Close once what we wrote is out, reading (and dropping) what the peer still sends.

        Closing with unread bytes would send a reset that can overtake our last message.
        """
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(HANG_UP_SECONDS, self.transport.abort)
        else:
            self.transport.close()

    def _check_stall(self):
        """Server side: close a connection stalled mid-message, or silent from the start.

        Between whole messages a connection may idle (clients pool them); a partial
        message holds memory, and a stalled one would hold it for good.
        """
        if self.transport.is_closing():
            return
        quiet = time.monotonic() - self.last_heard
        partial = (not self._heard_a_message
                   or (self._reader is not None and not self._reader.between_messages))
        if self._paused_reading:  # we stopped reading, not the peer sending
            partial, self.last_heard = False, time.monotonic()
        if partial and quiet >= self._stall_seconds:
            logger.warning("closing connection from %s: %s for %.0f s", self.comm.peer_address,
                           "stalled mid-message" if self._heard_a_message else
                           "no message", quiet)
            self.transport.abort()
            return
        self._stall_timer = asyncio.get_running_loop().call_later(
            max(self._stall_seconds - quiet, 0.05) if partial else self._stall_seconds,
            self._check_stall)

    def _become_ready(self):
        self._handshake = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not self.ready.done():
            self.ready.set_result(None)
        if self._on_connect is not None:
            self._on_connect(self.comm)

    def get_buffer(self, sizehint):
        if self._handshake is not None:  # exactly the handshake's bytes, nothing beyond
            buffer, filled, _ = self._handshake
            return memoryview(buffer)[filled:]
        if (self.ready.done() and self.ready.exception() is not None) or self._reader is None:
            # turned away, or lost (the loop may read once more after connection_lost):
            # read and drop
            return bytearray(SCRATCH_AFTER_REFUSAL)
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes):
        self.last_heard = time.monotonic()
        if self._handshake is not None:
            buffer, filled, step = self._handshake
            filled += nbytes
            self._handshake = (buffer, filled, step)
            if filled == len(buffer):
                step(buffer)
            return
        if not self.ready.done() or self.ready.exception() is not None or self._reader is None:
            return
        try:
            messages = self._reader.buffer_updated(nbytes)
        except ProtocolError as e:  # the stream cannot be trusted any further
            logger.warning("closing connection from %s: %s", self.comm.peer_address, e)
            self._reader = None
            self.failure = ProtocolError(f"refused what {self.comm.peer_address} sent: {e}")
            self.ready = _failed(asyncio.get_running_loop(), e)
            if self._server_side:  # say why, in the one message the peer can still read
                self.transport.writelines(dumps(_error_frame(e)))
                self._hang_up()
            else:
                self.transport.abort()
            return
        if messages:
            self._heard_a_message = True
            self._inbox.extend(messages)
            if len(self._inbox) >= MAX_QUEUED_MESSAGES and not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()
            self._wake("_waiter")

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._reader = None  # a message cut off mid-way: its buffers go now, not at next GC
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if not self.ready.done():
            self._handshake = None
            self.ready.set_exception(CommClosedError(
                "connection closed during the token handshake (does the server use the same "
                "auth token?)" if self._token else "connection closed"))
            self.ready.exception()
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake("_waiter")
        self._wake("_drain_waiter")

    def pause_writing(self):
        self._paused_writing = True

    def resume_writing(self):
        self.last_heard = time.monotonic()
        self._paused_writing = False
        self._wake("_drain_waiter")

    def wait(self, name):
        """A future resolved at the next wake of the waiters in attribute ``name``: each
        caller gets its own, so a caller that is cancelled cancels nobody else's wait
        (cheaper than sharing one behind asyncio.shield, at every message)."""
        waiters = getattr(self, name)
        if len(waiters) > 8:  # those that gave up (timed out) since the last wake
            waiters[:] = [w for w in waiters if not w.done()]
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return waiter

    def _wake(self, name):
        waiters = getattr(self, name)
        if waiters:
            setattr(self, name, [])
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


def _error_frame(exc):
    """An error reply made of plain fields only (nothing the peer would have to unpickle)."""
    return {"status": "error", "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc), "traceback": ""}


def _failed(loop, exc):
    future = loop.create_future()
    future.set_exception(exc)
    future.exception()
    return future


class Comm:
    """One framed connection: ``await send(msg)``, ``await recv()``, ``await close()``."""

    def __init__(self, protocol):
        self._protocol = protocol
        self._transport = protocol.transport
        peer = self._transport.get_extra_info("peername")
        self.peer_address = (format_address(*peer[:2]) if isinstance(peer, tuple)
                             else "a local process" if peer is not None else "unknown")

    @property
    def closed(self):
        return self._protocol.closed.done()

    async def send(self, msg, *, silence=None):
        """Write one message; return once the transport's buffer is below its high-water mark.

        With ``silence``, give up (PeerUnresponsiveError) when the peer takes none of our
        bytes for that many seconds.
        """
        frames = dumps(msg)
        if self.closed or self._transport.is_closing():
            raise self._closed_error("is closed")
        self._transport.writelines(frames)
        protocol = self._protocol
        start = time.monotonic()
        while protocol._paused_writing and not self.closed:
            await self._wait("_drain_waiter", start, silence, "took none of our bytes")
        if self.closed:
            raise self._closed_error("closed while sending")

    async def recv(self, *, silence=None):
        """The next message: a header dict, or a ProtocolError for an undecodable header.

        With ``silence``, give up (PeerUnresponsiveError) when the peer sends nothing for
        that many seconds: a large reply that keeps arriving is never cut off.
        """
        protocol = self._protocol
        start = time.monotonic()
        while not protocol._inbox:
            if self.closed:
                raise self._closed_error("closed")
            await self._wait("_waiter", start, silence, "sent nothing")
        msg = protocol._inbox.popleft()
        if protocol._paused_reading and len(protocol._inbox) < MAX_QUEUED_MESSAGES // 2:
            protocol._paused_reading = False
            self._transport.resume_reading()
        return msg

    async def _wait(self, name, start, silence, what):
        """Wait for the protocol's waiter ``name``; raise once the peer was silent too long."""
        protocol = self._protocol
        if silence is None:
            await protocol.wait(name)
            return
        quiet = time.monotonic() - max(start, protocol.last_heard)
        if quiet >= silence:
            self.abort()
            raise PeerUnresponsiveError(
                f"{self.peer_address} {what} for {silence:g} s: it is frozen, hung or too busy")
        try:
            async with asyncio.timeout(silence - quiet):
                await protocol.wait(name)
        except TimeoutError:
            pass  # the loop around us checks again how long the peer has been quiet

    def early_reply(self):
        """A message the peer sent before hanging up on us (its reason, say), or None."""
        return self._protocol._inbox.popleft() if self._protocol._inbox else None

    def _closed_error(self, how):
        """The peer's nonsense if that is why we hung up, else the connection closing."""
        if self._protocol.failure is not None:
            return self._protocol.failure
        return CommClosedError(f"connection to {self.peer_address} {how}")

    def abort(self):
        self._transport.abort()

    async def close(self):
        self._transport.close()
        await self._protocol.closed

    def __repr__(self):
        return f"<Comm to {self.peer_address}{' closed' if self.closed else ''}>"


async def connect(address, *, timeout=CONNECT_TIMEOUT, allocate=allocate_buffers,
                  security=NO_SECURITY):
    """Open a :class:`Comm` to ``address`` ('host:port'), authenticated as ``security`` says.

    ``allocate(values, lengths)`` chooses the buffers received payloads are written into.
    """
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    protocol = None
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                lambda: _FramedProtocol(allocate=allocate, token=security.token), host, port,
                ssl=security.client_ssl_context())
            await protocol.ready
    except BaseException as e:  # also cancelled (the client closing) mid-handshake
        if protocol is not None:  # (else its transport stays open: the loop cannot close)
            protocol.transport.abort()
        if isinstance(e, AuthenticationError):
            raise AuthenticationError(f"{address}: {e}") from None
        if isinstance(e, (OSError, TimeoutError, CommClosedError)):
            raise CommClosedError(f"cannot connect to {address}: {e or type(e).__name__}"
                                  ) from e
        raise
    return protocol.comm


class Listener:
    """A listening socket whose connections are each handled by ``handle_comm(comm)``.

    With ``local``, also an abstract Unix socket (``local_name``): the same connections,
    messages and handshake, for a caller on this host that learnt the name over TCP (see
    d3arrow.direct): sending a small message takes 1.4 us there, 4.6 us over loopback
    TCP (on this kind of machine; ``Pool.apply`` 80 -> 69 us a round trip).
    Every handling task is owned here and cancelled by :meth:`stop`.
    """

    def __init__(self, handle_comm, *, allocate=allocate_buffers, security=NO_SECURITY):
        self._handle_comm = handle_comm
        self._allocate = allocate
        self._security = security
        self._tasks = set()
        self._protocols = weakref.WeakSet()  # every open connection, handshaking or not
        self._servers = []
        self.address = None
        self.local_name = None

    async def start(self, host, port, *, local=False):
        security.check_bind(host, self._security.token)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._new_protocol, host, port, reuse_address=True,
            ssl=self._security.server_ssl_context())
        self._servers.append(server)
        self.address = format_address(host, server.sockets[0].getsockname()[1])
        if local:  # (abstract: nothing on disk, gone with the process)
            name = f"d3arrow-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            try:
                self._servers.append(await loop.create_unix_server(self._new_protocol,
                                                                   "\0" + name))
                self.local_name = name
            except OSError as e:  # callers on this host keep to TCP: slower, no worse
                logger.warning("no Unix socket beside %s (%s): local callers use TCP",
                               self.address, e)
        return self.address

    def _new_protocol(self):
        protocol = _FramedProtocol(on_connect=self._accept, allocate=self._allocate,
                                   token=self._security.token, server_side=True)
        self._protocols.add(protocol)
        return protocol

    def _accept(self, comm):
        task = asyncio.get_running_loop().create_task(self._serve(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, comm):
        try:
            await self._handle_comm(comm)
        except (CommClosedError, ProtocolError):  # gone, or hung up on (logged then)
            pass
        except Exception:
            logger.exception("error handling connection from %s", comm.peer_address)
        finally:
            comm.abort()

    def stop_accepting(self):
        for server in self._servers:
            server.close()

    async def stop(self):
        self.stop_accepting()
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
