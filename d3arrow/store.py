"""The shared store: values in shared memory that co-located processes use in place.

An owner (every worker, or any process using :class:`SharedStore` directly) keeps large
arrays and Arrow tables in its :class:`~d3arrow.arena.Arena`. A co-located reader receives
only a small reference (owner, id, offset, size, format); it opens a session with the owner
over an abstract Unix socket, receives the region's file descriptor once
(``socket.send_fds``), maps it read-only once, and from then on builds each value as a view
of the owner's memory: the cost does not grow with the value's size.

Lifetime: the reader *pins* each object it views, over its session. The owner keeps a pinned
allocation alive even after deleting its key, and drops the pin when the reader's view is
garbage collected (a release message) or the reader's process dies (the session closes).
A reader that already has a session names it (a token) when it asks for data, and the owner
pins while answering, which saves the reader the pin round trip.
Abstract sockets vanish with their process and are scoped to a network namespace, so
processes in different namespaces never mistake each other for co-located.
"""

import itertools
import logging
import mmap
import os
import select
import selectors
import socket
import struct
import threading
import uuid
import weakref

import numpy as np
import pyarrow as pa

from .arena import Arena, ArenaFull
from .errors import SpillError
from .serialize import Serialized, deserialize, is_shareable, serialize, serialize_into
from .spill import open_spilled

logger = logging.getLogger(__name__)

MIN_SHARED_BYTES = 64 * 2**10  # smaller values stay private: per-object costs would dominate
_RECORD = struct.Struct("<BQ")  # op or status, then an id
_PIN, _RELEASE, _HELLO = 1, 2, 3
_OK, _GONE = 1, 0
SESSION_TIMEOUT = 10.0
ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX = 0.01, 1.0  # seconds, while accept() fails
_IN_PLACE_KINDS = ("tensor", "arrow")  # one-buffer forms a reader can use where they lie


def host_id():
    """Same string <=> same kernel and network namespace, so a session could be opened."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{boot}/{netns}"


def default_capacity():
    """A quarter of the machine's memory: address space only, backed as it is used."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class SharedStore:
    """Owner side: puts values in shared memory and serves them to co-located readers.

    Parameters
    ----------
    capacity : int, optional
        Bytes of shared memory at most; default a quarter of the machine's memory.
    min_bytes : int, default 65536
        Values smaller than this are not worth sharing (see :meth:`put_value`).
    shared : bool, default True
        False keeps the arena private: nothing is offered to other processes, and the store
        only gives received values memory that is faulted in and reused (``--no-shm``).
    tight : bool, default False
        Hold no shared memory beyond the values (a worker with a memory limit): see
        :class:`~d3arrow.arena.Arena`.

    Examples
    --------
    In one process:

    >>> store = SharedStore()                               # doctest: +SKIP
    >>> ref = store.put(np.arange(10**8))                   # doctest: +SKIP
    >>> pickle.dumps(ref)  # send it by any means           # doctest: +SKIP

    In another process on the same host:

    >>> x = d3arrow.store.get(ref)   # a read-only view of the same memory   # doctest: +SKIP
    """

    def __init__(self, capacity=None, *, min_bytes=MIN_SHARED_BYTES, shared=True, tight=False):
        self.arena = Arena(capacity or default_capacity(), shared=shared, tight=tight)
        self.shared = shared
        self.min_bytes = min_bytes
        self.host = host_id() if shared else None
        self.socket_name = f"d3arrow-store-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.fallbacks = 0  # values kept in private memory because the store was full
        self.fallback_bytes = 0
        self._owned = {}  # id -> allocation, for put(): kept until delete()
        self._withdrawn = set()  # ids deleted while still viewed: no new pins
        self._pins = {}  # session socket -> {pin id: allocation}
        self._tokens = {}  # a reader's session token -> its session socket
        self._pin_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed = False
        if not shared:
            return
        # readers get a read-only descriptor of the region: they can view, never write
        self._reader_fd = os.open(f"/proc/self/fd/{self.arena.fd}", os.O_RDONLY | os.O_CLOEXEC)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.socket_name)
        self._listener.listen(64)
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="d3arrow-store-sessions")
        self._thread.start()

    # -- putting values in -------------------------------------------------------------------

    def shareable(self, value):
        """Whether :meth:`put_value` would take ``value`` (space permitting)."""
        return self.shared and is_shareable(value) and _nbytes(value) >= self.min_bytes

    def put_value(self, value):
        """Copy a shareable value into shared memory once; return ``(view, ref_meta)``.

        Returns None when the value is not worth sharing (small, or not an array / Arrow
        table) or when the store is full; in that case the caller keeps it in private
        memory, and a full store is counted in :attr:`fallbacks` and logged.
        """
        if not self.shareable(value):
            return None
        in_place = self._adopt_array(value)
        if in_place is not None:
            return in_place
        try:
            meta, buffer, block_id = self._write(value)
        except ArenaFull as e:
            self._note_fallback(_nbytes(value), e)
            return None
        return self._view_of(meta, buffer, block_id)

    def _adopt_array(self, array):
        """An array numpy made in our arena (see :mod:`d3arrow.numpy_allocator`) taken
        where it lies, its metadata written in front of it: ``(view, ref_meta)``; None
        for any other value."""
        if type(array) is not np.ndarray or not array.flags.c_contiguous:
            return None
        address = array.ctypes.data
        if not self.arena.holds_raw(address):
            return None
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        pieces = serialize(array).payloads[0]
        if len(pieces) != 2:  # a small tensor: one message
            return None
        metadata = memoryview(pieces[0])
        adopted = self.arena.adopt_raw(owner, address, array.nbytes, metadata)
        if adopted is None:
            return None
        block_id, start = adopted
        buffer = pa.foreign_buffer(self.arena.address + start, len(metadata) + array.nbytes,
                                   base=owner)
        return self._view_of({"kind": "tensor"}, buffer, block_id)

    def _write(self, value):
        """Copy a value into a new allocation: ``(meta, buffer, allocation id)``."""
        allocations = []

        def allocate(nbytes):
            allocations.append(self.arena.allocate(nbytes))
            return allocations[-1]

        meta, buffer = serialize_into(value, allocate)
        return meta, buffer, self.arena.block_id(allocations[0])

    def _view_of(self, meta, buffer, block_id):
        """The value stored in ``buffer`` and the reference readers need to view it."""
        view = deserialize(Serialized(meta, [buffer]))
        return view, self._ref_meta(meta, buffer, block_id)

    def _ref_meta(self, meta, buffer, block_id):
        return {"kind": "shm", "socket": self.socket_name, "host": self.host,
                "id": block_id, "offset": self.arena.offset_of(buffer),
                "size": buffer.size, "inner": meta}

    def allocate_payloads(self, values, lengths):
        """Receive buffers for a message: shareable payloads straight into shared memory."""
        buffers = [None] * len(lengths)
        for value in values:
            start, count = value.payloads
            if (count == 1 and value.meta.get("kind") in _IN_PLACE_KINDS
                    and lengths[start] >= self.min_bytes):
                try:
                    buffers[start] = self.arena.allocate(lengths[start])
                except ArenaFull as e:
                    self._note_fallback(lengths[start], e)
        return [b if b is not None else pa.allocate_buffer(n) for b, n in zip(buffers, lengths)]

    def adopt(self, serialized):
        """If a received value lies in our memory, its ``(view, ref_meta)``; else None."""
        if len(serialized.payloads) != 1 or serialized.meta.get("kind") not in _IN_PLACE_KINDS:
            return None
        (buffer,) = serialized.payloads
        block_id = self.arena.block_id(buffer) if isinstance(buffer, pa.Buffer) else None
        if block_id is None:
            return None
        return self._view_of(serialized.meta, buffer, block_id)

    def _note_fallback(self, nbytes, error):
        self.fallbacks += 1
        self.fallback_bytes += nbytes
        if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
            logger.warning("shared store full (%s): keeping %d bytes in private memory "
                           "(%d values so far)", error, nbytes, self.fallbacks)

    # -- library API -------------------------------------------------------------------------

    def put(self, value):
        """Copy ``value`` (numpy array or Arrow table / record batch) into the store.

        Returns
        -------
        StoreRef
            Small and picklable; :func:`get` turns it into a zero-copy view in any process
            on this host while the store holds the value.

        Raises
        ------
        TypeError
            The value has no Arrow form readers can use in place.
        ArenaFull
            The store has no room for it.
        """
        if not is_shareable(value):
            raise TypeError(f"cannot share {_describe(value)}: only numpy arrays of int/uint/"
                            "float dtypes in native byte order and Arrow tables / record batches")
        if not self.shared:
            raise TypeError("this store is private (shared=False)")
        meta, buffer, block_id = self._write(value)
        ref = StoreRef(self._ref_meta(meta, buffer, block_id))
        self._owned[block_id] = buffer
        return ref

    def delete(self, ref):
        """Forget a value put here: new :func:`get` calls fail, current readers keep their data."""
        block_id = ref.meta["id"]
        with self._lock:
            self._withdrawn = {i for i in self._withdrawn if self.arena.get(i) is not None}
            if self._owned.pop(block_id, None) is not None:
                self._withdrawn.add(block_id)

    def pin_for(self, token, block_id):
        """Pin an allocation for the reader whose session ``token`` names; its pin id or None."""
        with self._lock:
            return self._pin(self._pins.get(self._tokens.get(token)), block_id)

    def _pin(self, pins, block_id):
        """Pin a live, not withdrawn allocation in a session's ``pins``; its pin id or None.

        The caller holds the lock.
        """
        block = self.arena.get(block_id)
        if pins is None or block is None or block_id in self._withdrawn:
            return None
        pin_id = next(self._pin_ids)
        pins[pin_id] = block
        return pin_id

    def info(self):
        return {"shared": self.shared, "socket": self.socket_name if self.shared else None,
                "capacity": self.arena.capacity, "used": self.arena.used,
                "reserved": self.arena.reserved, "fallbacks": self.fallbacks,
                "fallback_bytes": self.fallback_bytes,
                "readers": len(self._pins), "pins": sum(map(len, self._pins.values()))}

    def close(self):
        """Stop serving sessions. Memory lives on while any process still views it."""
        if self.closed:
            return
        self.closed = True
        if self.shared:
            self._wakeup_w.send(b"x")
            self._thread.join(timeout=10)
            self._listener.close()
            os.close(self._reader_fd)
            self._wakeup_r.close()
            self._wakeup_w.close()
        with self._lock:
            self._pins.clear()
        self._owned.clear()
        self.arena.close()

    # -- sessions (thread) -------------------------------------------------------------------

    def _serve(self):
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, "accept")
        selector.register(self._wakeup_r, selectors.EVENT_READ, "stop")
        pending = {}
        backoff = ACCEPT_BACKOFF_MIN
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    if key.data == "accept":
                        try:
                            conn, _ = self._listener.accept()
                        except OSError as e:  # EMFILE, ENOMEM: wait for some to close
                            backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
                            logger.warning("store %s cannot accept a session (%s): retrying "
                                           "in %.2f s", self.socket_name, e, backoff)
                            self._wakeup_r.settimeout(backoff)  # sleep, but wake for close
                            try:
                                if self._wakeup_r.recv(1):
                                    return
                            except (TimeoutError, BlockingIOError):
                                pass
                            continue
                        backoff = ACCEPT_BACKOFF_MIN
                        try:
                            if not _same_user(conn):  # abstract sockets have no permissions
                                raise OSError("a reader of another user")
                            socket.send_fds(conn, [struct.pack("<Q", self.arena.capacity)],
                                            [self._reader_fd])
                        except OSError as e:
                            logger.warning("store %s: refused a session: %s",
                                           self.socket_name, e)
                            conn.close()
                            continue
                        with self._lock:
                            self._pins[conn] = {}
                        pending[conn] = b""
                        selector.register(conn, selectors.EVENT_READ, "session")
                        continue
                    conn = key.fileobj
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # the reader closed its session or died: drop its pins
                        selector.unregister(conn)
                        with self._lock:
                            self._pins.pop(conn, None)
                            self._tokens = {t: c for t, c in self._tokens.items() if c is not conn}
                        pending.pop(conn, None)
                        conn.close()
                        continue
                    pending[conn] = self._handle_records(conn, pending[conn] + data)
        finally:
            for conn in pending:
                conn.close()
            selector.close()

    def _handle_records(self, conn, data):
        replies = []
        usable = len(data) - len(data) % _RECORD.size
        for op, ident in _RECORD.iter_unpack(data[:usable]):
            with self._lock:
                pins = self._pins.get(conn)
                if op == _PIN:
                    pin_id = self._pin(pins, ident)
                    replies.append(_RECORD.pack(_GONE, 0) if pin_id is None
                                   else _RECORD.pack(_OK, pin_id))
                elif op == _RELEASE and pins is not None:
                    pins.pop(ident, None)
                elif op == _HELLO and pins is not None:
                    self._tokens[ident] = conn
        if replies:
            try:
                conn.sendall(b"".join(replies))
            except OSError:
                pass
        return data[usable:]


class StoreRef:
    """A picklable reference to a value in a :class:`SharedStore` on this host."""

    __slots__ = ("meta",)

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return StoreRef, (self.meta,)

    def __repr__(self):
        return f"StoreRef(id={self.meta['id']}, size={self.meta['size']}, owner={os.getpid()})"


class SharedDataGone(LookupError):
    """The owner no longer holds the value (or is gone); fetch it another way."""


def get(ref):
    """The value a :class:`StoreRef` names, as a read-only view of the owner's memory."""
    return load(Serialized(ref.meta, []))


def load(serialized, *, peer=None, timeout=None):
    """Deserialize a value, viewing shared memory in place for ``"shm"`` references (and
    the spilled file of a co-located worker for ``"spilled"`` ones).

    ``peer``, the address that sent the reference, is remembered so that later requests to
    it can name our session with its store (:func:`session_token`). ``timeout``: how long
    the owner may take to open our session with its store, and to pin the object if it was
    not pinned for us.

    Raises
    ------
    SharedDataGone
        The reference's owner has freed the value or cannot be reached.
    """
    meta = serialized.meta
    if meta.get("kind") == "spilled":  # a co-located worker's file: map it too
        try:
            return open_spilled(meta)
        except SpillError as e:
            raise SharedDataGone(str(e)) from None
    if meta.get("kind") != "shm":
        return deserialize(serialized)
    if peer is not None:
        _sessions.peer_stores[peer] = meta["socket"]
    buffer = _sessions.view(meta["socket"], meta["id"], meta["offset"], meta["size"],
                            pinned=meta.get("pin"), token=meta.get("token"), timeout=timeout)
    return deserialize(Serialized(meta["inner"], [buffer]))


def note_store_of(peer, socket_name):
    """``peer``'s store is ``socket_name``: later requests to it name our session."""
    _sessions.peer_stores[peer] = socket_name


def release_pin(meta):
    """Release the pin an owner made for us in a reference we will not view."""
    session = _sessions._sessions.get(meta.get("socket"))
    if session is not None and meta.get("token") == session.token and "pin" in meta:
        session.release(meta["pin"])


def _same_user(conn):
    """Whether the process at the other end of a Unix socket runs as our user (or root)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def open_session(socket_name):
    """Open this process's session with the store ``socket_name`` if it has none (this
    blocks on the owner: call it off the event loop). SharedDataGone if it cannot be."""
    try:
        _sessions._get(socket_name)
    except OSError as e:
        raise SharedDataGone(f"shared store {socket_name} cannot be reached: {e}") from None


def has_session(socket_name):
    session = _sessions._sessions.get(socket_name)
    return session is not None and session.alive


def session_token(peer):
    """The token of our session with ``peer``'s store, if we have one (else None)."""
    return _sessions.token(peer)


def _bounded(timeout):
    """How long to wait on an owner: the caller's ``timeout``, at most SESSION_TIMEOUT."""
    return SESSION_TIMEOUT if timeout is None else max(0.001, min(timeout, SESSION_TIMEOUT))


class _Session:
    """A reader's session with one owner: the mapped region and the socket for pins."""

    def __init__(self, socket_name, timeout=None):
        self.socket_name = socket_name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(_bounded(timeout))
        try:
            self.sock.connect("\0" + socket_name)
            data, fds, _, _ = socket.recv_fds(self.sock, 8, 1)
            if len(data) != 8 or len(fds) != 1:
                raise OSError(f"store {socket_name} sent no memory")
            (capacity,) = struct.unpack("<Q", data)
            try:
                self.mmap = mmap.mmap(fds[0], capacity, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ)
            finally:
                os.close(fds[0])
            self.token = int.from_bytes(os.urandom(8), "little")
            self.sock.sendall(_RECORD.pack(_HELLO, self.token))
            self.sock.settimeout(SESSION_TIMEOUT)
        except BaseException:
            self.sock.close()
            raise
        self.address = np.frombuffer(self.mmap, dtype=np.uint8).ctypes.data
        self.lock = threading.RLock()  # a release may run from GC while a pin is under way
        self.alive = True
        # the owner keeps our pins while the socket is open: it closes when we close the
        # session (its owner gone), or once nothing of ours needs its pins
        self._closer = weakref.finalize(self, self.sock.close)

    def pin(self, block_id, timeout=None):
        """Pin an object; its pin id, or None if the owner no longer holds it. OSError if
        the owner does not answer within ``timeout`` (at most SESSION_TIMEOUT)."""
        with self.lock:
            if timeout is not None:
                self.sock.settimeout(_bounded(timeout))
            try:
                self.sock.sendall(_RECORD.pack(_PIN, block_id))
                reply = b""
                while len(reply) < _RECORD.size:
                    chunk = self.sock.recv(_RECORD.size - len(reply))
                    if not chunk:
                        raise OSError("owner closed the session")
                    reply += chunk
            finally:
                if timeout is not None:
                    self.sock.settimeout(SESSION_TIMEOUT)
        status, pin_id = _RECORD.unpack(reply)
        return pin_id if status == _OK else None

    def release(self, pin_id):
        if not self.alive:
            return
        try:
            with self.lock:
                self.sock.sendall(_RECORD.pack(_RELEASE, pin_id))
        except OSError:
            self.alive = False

    def owner_gone(self):
        """Whether the owner closed the session (it exited, or died)."""
        with self.lock:
            try:
                # a socket with a timeout waits before recv: ask whether it is readable first
                readable, _, _ = select.select([self.sock], [], [], 0)
                return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

    def close(self):
        """Stop using the session: its owner is gone. The mapping goes when the last view
        of it does."""
        self.alive = False
        with self.lock:  # not under a pin another thread is making
            self._closer()


class _Sessions:
    """This process's sessions with owners, one per owner, opened on first use."""

    def __init__(self):
        self._sessions = {}
        self._lock = threading.Lock()
        self.peer_stores = {}  # peer address -> the socket name of its store

    def token(self, peer):
        session = self._sessions.get(self.peer_stores.get(peer))
        return session.token if session is not None and session.alive else None

    def view(self, socket_name, block_id, offset, size, *, pinned=None, token=None,
             timeout=None):
        """A read-only buffer over an owner's object, pinned for as long as it lives.
        ``timeout``: for opening the session, and the pin if the owner must be asked."""
        self._sweep()
        try:
            session = self._get(socket_name, timeout)
            if pinned is not None and token == session.token:
                pin_id = pinned  # the owner pinned it for us while answering
            else:
                pin_id = session.pin(block_id, timeout)
        except OSError as e:
            self._drop(socket_name)
            raise SharedDataGone(f"shared store {socket_name} cannot be reached: {e}") from None
        if pin_id is None:
            raise SharedDataGone(f"shared store {socket_name} no longer holds object {block_id}")
        pin = _Pin(session, pin_id)
        return pa.foreign_buffer(session.address + offset, size, base=pin)

    def _sweep(self):
        """Forget sessions whose owner is gone, so their memory is unmapped (and, once no
        process maps it, freed) as soon as our last view of it is collected."""
        with self._lock:
            gone = [name for name, s in self._sessions.items() if s.owner_gone()]
        for name in gone:
            self._drop(name, owner_gone=True)

    def _drop(self, socket_name, *, owner_gone=False):
        """Use our session with ``socket_name`` no more (a pin went unanswered: a late
        answer would be read as the next one's). Its socket closes now if the owner is
        gone, else once no view of ours needs the pins it holds."""
        with self._lock:
            session = self._sessions.pop(socket_name, None)
        if session is not None:
            if owner_gone:
                session.close()
            else:
                session.alive = False

    def _get(self, socket_name, timeout=None):
        """Our live session with ``socket_name``, opened if need be. Opening waits on the
        owner, so not under our lock: a frozen owner holds up no view of another store."""
        with self._lock:
            session = self._sessions.get(socket_name)
        if session is not None and session.alive:
            return session
        opened = _Session(socket_name, timeout)
        with self._lock:
            session = self._sessions.get(socket_name)
            if session is not None and session.alive:  # another thread opened one meanwhile
                stale = opened
            else:
                stale, session = session, opened
                self._sessions[socket_name] = opened
        if stale is not None:
            stale.close()  # the one just opened (no pins yet), or one that failed a release
        return session


class _Pin:
    """Held by every view of a pinned object; its collection releases the pin."""

    __slots__ = ("__weakref__",)

    def __init__(self, session, pin_id):
        weakref.finalize(self, session.release, pin_id)


_sessions = _Sessions()


def _describe(value):
    if isinstance(value, np.ndarray):
        if value.dtype.byteorder not in "=|":
            return (f"an array of non-native byte order ({value.dtype.str}): convert it with "
                    f".astype({value.dtype.newbyteorder('=').str!r}) first")
        return f"an array of dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _nbytes(value):
    return value.nbytes
