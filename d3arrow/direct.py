"""Requests from the caller's own thread: a blocking connection per thread and worker.

A request through the client's event loop crosses threads twice each way (the caller hands
it to the loop, the loop hands the reply back). On this kind of machine every crossing
wakes a sleeping core, about 50 us of CPU each, so a short call the caller waits for
anyway (``Pool.apply``) costs more in crossings than in work. Here the caller's thread
writes the request itself and reads the reply itself: the same messages, framing
(:mod:`d3arrow.protocol`) and token handshake (:mod:`d3arrow.security`) as
:mod:`d3arrow.comm`, over a plain blocking socket (TLS-wrapped if the cluster uses TLS; a
Unix socket to a server on our host, where it offers one).

Failures are the caller's to handle: :class:`~d3arrow.errors.CommClosedError` says the
connection failed, and whether the request had been written (``sent``).
"""

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref

from . import security
from .addressing import parse_address
from .core import raise_for_error
from .eventloop import SPIN_SECONDS, current_cpu
from .errors import AuthenticationError, CommClosedError, ProtocolError
from .protocol import MessageReader, dumps
from .security import NO_SECURITY, Security

logger = logging.getLogger(__name__)

JOIN_BYTES = 2**16  # a TLS socket has no sendmsg: frames up to this total are joined first
IOV_MAX = 512  # frames per sendmsg (the kernel refuses more than 1024)


class DirectCallFailed(CommClosedError):
    """The connection failed; ``sent``: after the whole request was written (the worker
    may have had it in hand when it died)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class DirectLink:
    """One blocking connection to one server, used by one thread at a time.

    Given our ``host`` (d3arrow.store.host_id), a link to a server on it that offers a
    Unix socket moves there (see comm.Listener): a round trip ~9 us shorter than over
    loopback TCP. The socket's name comes over TCP, from the server itself, and
    the process listening on it must be the one that answered: an abstract name anyone on
    the host could have taken. Any doubt keeps the TCP connection.
    """

    def __init__(self, address: str, security_: Security, connect_timeout: float,
                 host: str | None = None) -> None:
        self.address = address
        self._reader = MessageReader()
        self._poll = select.poll()
        self._missed = 0  # polls in a row (for SPIN_SECONDS) that saw no reply
        self._skip = 0  # requests to make without polling, after polls that saw nothing
        host_, port = parse_address(address)
        self._use(_opened(lambda: socket.create_connection((host_, port), connect_timeout),
                          address, security_))
        if host is not None and not self._tls:
            self._go_local(host, security_, connect_timeout)

    def _use(self, sock):
        """Talk over ``sock`` from now on (the socket used so far is closed)."""
        if getattr(self, "_closer", None) is not None:
            self._poll.unregister(self._sock)
            self._closer()
        sock.settimeout(0.0)  # see _send
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._poll.register(sock, select.POLLIN)
        self._closer = weakref.finalize(self, sock.close)

    def _go_local(self, host, security_, connect_timeout):
        try:
            local = self.request({"op": "identity"},
                                 deadline=time.monotonic() + connect_timeout).get("local")
        except (DirectCallFailed, TimeoutError) as e:  # failed, or frozen: as if never made
            self.close()
            raise DirectCallFailed(f"{self.address} did not answer: {e}", sent=False) from e
        except Exception:  # an error reply (an older server, say): TCP it is
            return
        if not (type(local) is dict and local.get("host") == host
                and type(local.get("socket")) is str and type(local.get("pid")) is int):
            return

        def connect():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect("\0" + local["socket"])
                if _peer_pid(sock) != local["pid"]:
                    raise OSError(f"another process listens on {local['socket']}")
            except BaseException:
                sock.close()
                raise
            return sock
        try:
            sock = _opened(connect, self.address, security_)
        except (DirectCallFailed, AuthenticationError) as e:
            logger.debug("staying on TCP to %s: %s", self.address, e)
            return
        self._use(sock)

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def usable(self) -> bool:
        """Whether it can carry a request: open, and nothing (an EOF) waiting to be read."""
        return not self.closed and not self._poll.poll(0)

    def request(self, msg: dict, *, deadline: float | None = None, watch: float = 1.0,
                still_there=None, silence: float = 30.0) -> dict:
        """Send ``msg``; the reply header (an error reply is raised, as its own type).

        Waits past ``deadline`` (``time.monotonic()``) raise TimeoutError. Without one it
        waits as long as the server computes, asking ``still_there()`` after every
        ``watch`` seconds of quiet; False gives up (DirectCallFailed, ``sent``). Writing
        stalled for ``silence`` seconds gives up too. The connection is closed after any
        failure (its state is unknown), also an interrupt.
        """
        sent = False
        # we wait for the reply, then likely ask again at once: from this core
        msg["stay_awake"] = current_cpu()
        try:
            self._send(dumps(msg), silence)
            sent = True
            done = self._poll_for_reply()
            if not done:  # a slow reply: sleep until it comes (the socket had no timeout)
                done = self._wait_for_reply(deadline, watch, still_there)
        except BaseException as e:
            self.close()
            if isinstance(e, OSError) and not isinstance(e, (DirectCallFailed, TimeoutError)):
                raise DirectCallFailed(f"connection to {self.address} failed: {e}",
                                       sent=sent) from e
            if isinstance(e, TimeoutError) and not sent:
                raise DirectCallFailed(f"{self.address} took no request for {silence} s",
                                       sent=False) from None
            raise
        if isinstance(done[0], ProtocolError):
            raise done[0]
        return raise_for_error(done[0])

    def _wait_for_reply(self, deadline, watch, still_there):
        """The reply, read asleep (see :meth:`request` for the arguments)."""
        done = []
        try:
            while not done:
                wait = watch if deadline is None else min(watch, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"no reply from {self.address} in time")
                self._sock.settimeout(wait)
                try:
                    n = self._sock.recv_into(self._reader.get_buffer())
                except TimeoutError:  # socket.timeout
                    if deadline is None and still_there is not None and not still_there():
                        raise DirectCallFailed(f"worker {self.address} was dropped by the "
                                               "center and does not answer", sent=True)
                    continue
                if n == 0:
                    raise DirectCallFailed(f"{self.address} closed the connection", sent=True)
                done = self._reader.buffer_updated(n)
        finally:
            self._sock.settimeout(0.0)
        return done

    def _poll_for_reply(self):
        """The reply, if it comes within SPIN_SECONDS, read awake; else []. After polls
        that saw nothing (a slow function), the next 1, 3, 7, ... 63 requests do not poll:
        a hiccup costs one request's polling, a slow function almost none. A poll that
        overran counts as one that saw nothing: another process had our core (each
        sched_yield gives it a whole time slice: 4 ms a round trip instead of 0.08),
        where asleep we are woken as soon as the reply comes."""
        if self._skip:
            self._skip -= 1
            return []
        start = time.perf_counter()
        done = self._receive_soon(SPIN_SECONDS)
        if done and time.perf_counter() - start < 2 * SPIN_SECONDS:
            self._missed = 0
        else:
            self._missed = min(self._missed + 1, 6)
            self._skip = 2 ** self._missed - 1
        return done

    def _receive_soon(self, seconds):
        """The messages that arrived whole within ``seconds``, read without sleeping (see
        d3arrow.eventloop.SPIN_SECONDS); a process waiting for this core gets it."""
        sock, reader = self._sock, self._reader
        end = time.perf_counter() + seconds
        while True:
            try:
                n = sock.recv_into(reader.get_buffer())
            except (BlockingIOError, ssl.SSLWantReadError):  # (TLS: no whole record yet)
                if time.perf_counter() >= end:
                    return []
                os.sched_yield()
                continue
            if n == 0:
                raise DirectCallFailed(f"{self.address} closed the connection", sent=True)
            done = reader.buffer_updated(n)
            if done:
                return done

    def _send(self, frames, silence):
        """Write the frames; TimeoutError if the server takes none of them for ``silence``
        seconds. (Between requests the socket has no timeout: one with a timeout polls
        before every send, a system call more; a small request never waits for room.)"""
        views = [memoryview(f).cast("B") for f in frames]  # lengths in bytes
        if self._tls:
            if sum(map(len, views)) <= JOIN_BYTES:
                views = [b"".join(views)]
            self._sock.settimeout(silence)
            try:
                for view in views:
                    self._sock.sendall(view)
            finally:
                self._sock.settimeout(0.0)
            return
        first = 0
        while first < len(views):  # one system call for a small request, however many frames
            try:
                sent = self._sock.sendmsg(views[first:first + IOV_MAX])
            except BlockingIOError:  # the server's buffer is full: wait for room
                if not select.select([], [self._sock], [], silence)[1]:
                    raise TimeoutError(f"{self.address} took none of our bytes") from None
                continue
            while first < len(views) and sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            if sent:
                views[first] = views[first][sent:]

    def close(self) -> None:
        if self._closer.alive:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread reading it
            except OSError:
                pass
            self._closer()


def _opened(connect, address, security_):
    """A socket from ``connect()``, set up as ``security_`` says (TLS, the token's
    handshake): DirectCallFailed if that fails, AuthenticationError if refused."""
    try:
        sock = connect()
    except OSError as e:
        raise DirectCallFailed(f"cannot connect to {address}: {e}", sent=False) from e
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = security_.client_ssl_context()
        if context is not None:
            sock = context.wrap_socket(sock)
        if security_.token is not None:
            _handshake(sock, security_.token)
    except BaseException as e:
        sock.close()
        if isinstance(e, AuthenticationError):
            raise AuthenticationError(f"{address}: {e}") from None
        if isinstance(e, OSError):
            raise DirectCallFailed(f"cannot connect to {address}: {e}", sent=False) from e
        raise
    return sock


def _peer_pid(sock):
    """The process at the other end of a Unix socket (for a server: the one listening)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _handshake(sock, token):
    """The client's side of the token handshake (see d3arrow.security), blocking."""
    nonce = security.new_nonce()
    sock.sendall(security.hello(nonce))
    server_nonce = security.check_challenge(token, _read(sock, security.CHALLENGE_BYTES), nonce)
    sock.sendall(security.proof(token, b"client", server_nonce, nonce))
    if _read(sock, 1) != security.ACCEPTED:
        raise AuthenticationError("the server refused this connection's auth token")


def _read(sock, nbytes):
    data = bytearray()
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection during the handshake")
        data += chunk
    return bytes(data)


class DirectLinks:
    """The links of every thread of one client: each thread its own, per worker."""

    def __init__(self, security_: Security = NO_SECURITY, connect_timeout: float = 10.0,
                 host: str | None = None):
        self._security = security_
        self._connect_timeout = connect_timeout
        self._host = host  # ours: links to servers on it may move to a Unix socket
        self._local = threading.local()
        self._all = weakref.WeakSet()  # to close them all, whichever thread holds them
        self._lock = threading.Lock()
        self.closed = False

    def link(self, address: str) -> DirectLink:
        """This thread's usable link to ``address``, opened if need be."""
        links = getattr(self._local, "links", None)
        if links is None:
            links = self._local.links = {}
        link = links.get(address)
        if link is not None and link.usable():
            return link
        if link is not None:
            link.close()
        if self.closed:
            raise DirectCallFailed("the client is closed", sent=False)
        link = links[address] = DirectLink(address, self._security, self._connect_timeout,
                                           self._host)
        with self._lock:
            self._all.add(link)
        return link

    def close(self) -> None:
        self.closed = True
        with self._lock:
            links = list(self._all)
        for link in links:
            link.close()
