"""Framed connections over TCP on the running event loop (uvloop in every d3arrow process).

A :class:`Comm` sends and receives whole messages (see :mod:`d3arrow.protocol`). Receiving
goes through an ``asyncio.BufferedProtocol`` so the kernel writes payload bytes straight
into the buffers the values will live in; sending hands the payload pieces to
``transport.writelines`` as they are, and ``send`` waits while the transport is over its
high-water mark, so bytes in flight stay bounded.
"""

import asyncio
import collections
import logging
import socket

from .addressing import format_address, parse_address
from .errors import CommClosedError, ProtocolError
from .protocol import MessageReader, allocate_buffers, dumps

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
MAX_QUEUED_MESSAGES = 16  # received but not yet taken by recv(): stop reading beyond this


class _FramedProtocol(asyncio.BufferedProtocol):
    def __init__(self, on_connect=None, allocate=allocate_buffers):
        self._reader = MessageReader(allocate=allocate)
        self._on_connect = on_connect
        self._inbox = collections.deque()
        self._waiter = None
        self._drain_waiter = None
        self._paused_writing = False
        self._paused_reading = False
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self.comm = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.comm = Comm(self)
        if self._on_connect is not None:
            self._on_connect(self.comm)

    def get_buffer(self, sizehint):
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes):
        try:
            messages = self._reader.buffer_updated(nbytes)
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", self.comm.peer_address, e)
            self.transport.abort()
            return
        if messages:
            self._inbox.extend(messages)
            if len(self._inbox) >= MAX_QUEUED_MESSAGES and not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()
            self._wake(self._waiter)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake(self._waiter)
        self._wake(self._drain_waiter)

    def pause_writing(self):
        self._paused_writing = True

    def resume_writing(self):
        self._paused_writing = False
        self._wake(self._drain_waiter)

    def wait(self, name):
        """Wait until the future stored in attribute ``name`` is woken; waiters share it."""
        waiter = getattr(self, name)
        if waiter is None or waiter.done():
            waiter = asyncio.get_running_loop().create_future()
            setattr(self, name, waiter)
        return asyncio.shield(waiter)

    @staticmethod
    def _wake(waiter):
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Comm:
    """One framed connection: ``await send(msg)``, ``await recv()``, ``await close()``."""

    def __init__(self, protocol):
        self._protocol = protocol
        self._transport = protocol.transport
        peer = self._transport.get_extra_info("peername")
        self.peer_address = format_address(*peer[:2]) if peer else "unknown"

    @property
    def closed(self):
        return self._protocol.closed.done()

    async def send(self, msg):
        """Write one message; return once the transport's buffer is below its high-water mark."""
        frames = dumps(msg)
        if self.closed or self._transport.is_closing():
            raise CommClosedError(f"connection to {self.peer_address} is closed")
        self._transport.writelines(frames)
        protocol = self._protocol
        while protocol._paused_writing and not self.closed:
            await protocol.wait("_drain_waiter")
        if self.closed:
            raise CommClosedError(f"connection to {self.peer_address} closed while sending")

    async def recv(self):
        """The next message: a header dict, or a ProtocolError for an undecodable header."""
        protocol = self._protocol
        while not protocol._inbox:
            if self.closed:
                raise CommClosedError(f"connection to {self.peer_address} closed")
            await protocol.wait("_waiter")
        msg = protocol._inbox.popleft()
        if protocol._paused_reading and len(protocol._inbox) < MAX_QUEUED_MESSAGES // 2:
            protocol._paused_reading = False
            self._transport.resume_reading()
        return msg

    def abort(self):
        self._transport.abort()

    async def close(self):
        self._transport.close()
        await self._protocol.closed

    def __repr__(self):
        return f"<Comm to {self.peer_address}{' closed' if self.closed else ''}>"


async def connect(address, *, timeout=CONNECT_TIMEOUT, allocate=allocate_buffers):
    """Open a :class:`Comm` to ``address`` ('host:port').

    ``allocate(values, lengths)`` chooses the buffers received payloads are written into.
    """
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                lambda: _FramedProtocol(allocate=allocate), host, port)
    except (OSError, TimeoutError) as e:
        raise CommClosedError(f"cannot connect to {address}: {e or type(e).__name__}") from e
    return protocol.comm


class Listener:
    """A listening socket whose connections are each handled by ``handle_comm(comm)``.

    Every handling task is owned here and cancelled by :meth:`stop`.
    """

    def __init__(self, handle_comm, *, allocate=allocate_buffers):
        self._handle_comm = handle_comm
        self._allocate = allocate
        self._tasks = set()
        self._comms = set()
        self._server = None
        self.address = None

    async def start(self, host, port):
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FramedProtocol(on_connect=self._accept, allocate=self._allocate), host, port,
            reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        self.address = format_address(host, bound[1])
        return self.address

    def _accept(self, comm):
        task = asyncio.get_running_loop().create_task(self._serve(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, comm):
        self._comms.add(comm)
        try:
            await self._handle_comm(comm)
        except CommClosedError:
            pass
        except Exception:
            logger.exception("error handling connection from %s", comm.peer_address)
        finally:
            self._comms.discard(comm)
            comm.abort()

    async def stop(self):
        if self._server is not None:
            self._server.close()
        for comm in list(self._comms):
            comm.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
