"""Messages <-> bytes on the wire. Pure functions and a push decoder: no sockets, no loop.

A message is a msgpack header (a dict, usually with ``"op"`` or ``"status"``) plus payloads.
Values inside the header are :class:`~d3arrow.serialize.Serialized` objects, packed as a
msgpack extension that names their meta and which payloads are theirs; their bytes travel
after the header as separate payloads and are never joined into one big object. A small
pickle (a call's arguments, a function) travels inside its extension instead: a receive
buffer of its own and a copy into it cost more than the bytes (a compute request parsed
in 7.0 -> 5.1 us; sending it 4.4 -> 3.2 us).

Wire layout of one message::

    u64 header_length | u64 n_payloads | n_payloads x u64 payload_length | header | payloads

The decoder checks every announced length against its limits before it allocates anything.
Control headers decode without pickle: a peer can only make us unpickle by naming a value
that a handler then chooses to deserialize.
"""

import os
import struct
import threading

import msgpack
import pyarrow as pa

from .errors import ProtocolError
from .serialize import Serialized, payload_nbytes

PREFIX = struct.Struct("<QQ")
SERIALIZED_EXT = 1
INLINE_EXT = 2  # a Serialized with its one payload's bytes inside the header
INLINE_BYTES = 1024  # the largest payload that travels so
_INLINE_KINDS = frozenset({"pickle", "args", "keys"})  # (no arrays: they keep alignment)
MAX_HEADER_BYTES = 64 * 2**20
MAX_PAYLOADS = 2**20
SCRATCH_BYTES = 64 * 2**10  # small reads land here; larger remainders go straight to their buffer


def default_max_payload_bytes():
    """Half the machine's memory: more than one message could never be received anyway."""
    env = os.environ.get("D3ARROW_MAX_MESSAGE_BYTES")
    if env:
        return int(env)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class _Encoder(threading.local):
    """This thread's msgpack packers, made once (``msgpack.packb`` makes a packer, and its
    buffer, at every call), and the payloads of the message being encoded."""

    def __init__(self):
        self.payloads = []
        self.header = msgpack.Packer(default=self._default, use_bin_type=True)
        self.ext = msgpack.Packer(use_bin_type=True)

    def _default(self, obj):
        if isinstance(obj, Serialized):
            inline = _inline_bytes(obj)
            if inline is not None:
                return _ext(INLINE_EXT, self.ext.pack([obj.meta, inline]))
            payloads = self.payloads
            ext = self.ext.pack([obj.meta, len(payloads), len(obj.payloads)])
            payloads.extend(obj.payloads)
            return _ext(SERIALIZED_EXT, ext)
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        raise TypeError(
            f"cannot put a {type(obj).__name__} in a message header; serialize() it first"
        )


_encoder = _Encoder()


def _ext(code, data):
    """``msgpack.ExtType(code, data)`` without its argument checks (0.37 -> 0.15 us)."""
    return tuple.__new__(msgpack.ExtType, (code, data))


def _inline_bytes(value):
    """The bytes of a small pickle that travels inside the header, or None."""
    payloads = value.payloads
    if len(payloads) != 1 or value.meta.get("kind") not in _INLINE_KINDS:
        return None
    (payload,) = payloads
    if type(payload) is list and len(payload) == 1 and type(payload[0]) is bytes:  # (most)
        return payload[0] if len(payload[0]) <= INLINE_BYTES else None
    if payload_nbytes(payload) > INLINE_BYTES:
        return None
    return b"".join(payload) if isinstance(payload, list) else memoryview(payload)


def dumps(header):
    """Encode a message as a list of bytes-like frames to write in order (no payload copies)."""
    encoder = _encoder
    encoder.payloads = payloads = []
    head = encoder.header.pack(header)  # (a packer that fails midway starts afresh)
    if not payloads:  # (most control messages)
        return [PREFIX.pack(len(head), 0) + head]
    lengths = [payload_nbytes(p) for p in payloads]
    frames = [PREFIX.pack(len(head), len(lengths)) + struct.pack(f"<{len(lengths)}Q", *lengths) + head]
    for payload in payloads:
        frames.extend(payload)
    return frames


def allocate_buffers(values, lengths):
    """Default receive buffers: one Arrow buffer per payload, so values can outlive messages.

    ``values`` are the message's Serialized values, their ``payloads`` still
    ``(start, count)``: an allocator may place a value's payloads by its kind.
    """
    return [pa.allocate_buffer(n) for n in lengths]


def loads_header(data, n_payloads):
    """Decode a header; return it and the Serialized values in it (payloads not yet attached)."""
    values = []

    def ext_hook(code, data):
        if code == INLINE_EXT:
            meta, payload = msgpack.unpackb(data, raw=False)
            if not (isinstance(meta, dict) and type(payload) is bytes):
                raise ProtocolError("a serialized value's inline payload is not bytes")
            return Serialized(meta, [pa.py_buffer(payload)])
        if code != SERIALIZED_EXT:
            raise ProtocolError(f"unknown msgpack extension type {code}")
        meta, start, count = msgpack.unpackb(data, raw=False)
        if not (isinstance(meta, dict) and isinstance(start, int) and isinstance(count, int)
                and 0 <= start and 0 <= count and start + count <= n_payloads):
            raise ProtocolError("a serialized value names payloads the message does not have")
        value = Serialized(meta, (start, count))
        values.append(value)
        return value

    try:
        header = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"undecodable message header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"a message header must be a map, got {type(header).__name__}")
    return header, values


class MessageReader:
    """Incremental decoder: feed it bytes through ``get_buffer`` / ``buffer_updated``.

    ``get_buffer`` returns where the next bytes should go: a slice of the destination buffer
    when a large remainder is expected (so the kernel writes payloads once, in place), else
    a small scratch buffer whose contents ``buffer_updated`` distributes.
    ``buffer_updated`` returns the messages completed: a header dict, or a
    :class:`ProtocolError` for a well-framed message whose header did not decode (the
    connection can go on). A framing error raises :class:`ProtocolError`: the stream
    cannot be trusted any further.
    """

    def __init__(self, *, allocate=allocate_buffers, max_header_bytes=MAX_HEADER_BYTES,
                 max_payload_bytes=None):
        self._allocate = allocate
        self._max_header = max_header_bytes
        self._max_payload = max_payload_bytes or default_max_payload_bytes()
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._direct = False
        self._start_message()

    @property
    def between_messages(self):
        """Whether no message is partly received."""
        return self._stage == "prefix" and self._filled == 0

    def get_buffer(self):
        remaining = len(self._target) - self._filled
        self._direct = remaining >= SCRATCH_BYTES
        return self._target[self._filled:] if self._direct else self._scratch

    def buffer_updated(self, nbytes):
        done = []
        if self._direct:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._advance(done)
            return done
        data = self._scratch[:nbytes]
        pos = self._whole_messages(data, done) if self.between_messages else 0
        while pos < nbytes:
            take = min(nbytes - pos, len(self._target) - self._filled)
            self._target[self._filled:self._filled + take] = data[pos:pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._target):
                self._advance(done)
        return done

    def _start_message(self):
        self._stage = "prefix"
        self._set_target(bytearray(PREFIX.size))

    def _set_target(self, buffer):
        self._target = memoryview(buffer).cast("B")
        self._filled = 0

    def _whole_messages(self, data, done):
        """Decode the messages that lie whole at the start of ``data`` in one go (a small
        message arrives in one read; the stages below would copy it piece by piece); the
        bytes they took. The rest goes through the stages."""
        pos, end = 0, len(data)
        while end - pos >= PREFIX.size:
            header_len, n = PREFIX.unpack_from(data, pos)
            if not 0 < header_len <= self._max_header or n > MAX_PAYLOADS:
                self._check_prefix(header_len, n, data[pos:pos + PREFIX.size])
            head = pos + PREFIX.size
            body = head + 8 * n + header_len
            if body > end:
                break
            if n:
                lengths = struct.unpack_from(f"<{n}Q", data, head)
                total = sum(lengths)
                if body + total > end:
                    break
                self._check_total(total)
            try:
                header, values = loads_header(data[head + 8 * n:body], n)
            except ProtocolError as e:
                header, values = e, []
            if n:  # (most control messages have no payloads: nothing to allocate)
                buffers = self._allocate(values, lengths)
                for buffer, length in zip(buffers, lengths):
                    if length:
                        memoryview(buffer).cast("B")[:] = data[body:body + length]
                        body += length
                _attach(values, buffers)
            elif values:  # (plain values: no payloads)
                _attach(values, [])
            done.append(header)
            pos = body
        return pos

    def _check_prefix(self, header_len, n, prefix):
        if not 0 < header_len <= self._max_header:
            raise ProtocolError(f"message header of {header_len} bytes announced "
                                f"(limit {self._max_header}); the stream began "
                                f"{bytes(prefix)!r}")
        if n > MAX_PAYLOADS:
            raise ProtocolError(f"{n} payloads announced (limit {MAX_PAYLOADS})")

    def _check_total(self, total):
        if total > self._max_payload:
            raise ProtocolError(f"{total} payload bytes announced (limit {self._max_payload})")

    def _advance(self, done):
        if self._stage == "prefix":
            header_len, n = PREFIX.unpack(self._target)
            self._check_prefix(header_len, n, self._target)
            self._n = n
            self._stage = "head"
            self._head_parts, self._head_left = [], 8 * n + header_len
            self._next_head_part()
        elif self._stage == "head":
            self._head_parts.append(self._target.obj)
            self._head_left -= len(self._target)
            if self._head_left:
                self._next_head_part()
                return
            n = self._n
            parts = self._head_parts
            head = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
            self._head_parts = None
            lengths = struct.unpack_from(f"<{n}Q", head)
            self._check_total(sum(lengths))
            try:
                self._header, self._values = loads_header(head[8 * n:], n)
            except ProtocolError as e:
                self._header, self._values = e, []
            self._buffers = self._allocate(self._values, lengths)
            self._stage, self._index = "payload", -1
            self._next_payload(done)
        else:
            self._next_payload(done)

    def _next_head_part(self):
        """Take memory for the header as its bytes come: an announced size costs nothing.

        Parts double in size, so joining them copies the header about once more.
        """
        received = sum(map(len, self._head_parts))
        self._set_target(bytearray(min(self._head_left, max(SCRATCH_BYTES, received))))

    def _next_payload(self, done):
        self._index += 1
        while self._index < len(self._buffers) and len(self._buffers[self._index]) == 0:
            self._index += 1
        if self._index < len(self._buffers):
            self._set_target(self._buffers[self._index])
            return
        _attach(self._values, self._buffers)
        done.append(self._header)
        self._header = self._values = self._buffers = None
        self._start_message()


def _attach(values, buffers):
    """Give each Serialized value of a message its payload buffers."""
    for value in values:
        start, count = value.payloads
        value.payloads = buffers[start:start + count]
