"""Values <-> Arrow buffers.

A value becomes a :class:`Serialized`: a small msgpack-able ``meta`` dict and a list of
payloads. Each payload is sent as a list of pieces and received as one contiguous buffer.

* numpy arrays whose dtype Arrow tensors support travel as Arrow IPC tensors: one payload of
  two pieces, the tensor's IPC metadata and the array's own memory (never copied on send).
  The receiver lays both in one buffer and ``pa.ipc.read_tensor`` rebuilds a read-only view.
* pyarrow Tables and RecordBatches travel as an Arrow IPC stream.
* ints, floats, strings, bytes, booleans and None travel as themselves inside the msgpack
  header: no payload, no pickle. Strings and bytes over 64 KiB travel as a payload instead
  (headers are for control, and are limited in size).
* anything else goes through cloudpickle protocol 5 with out-of-band buffers, so arrays
  nested inside Python objects are not copied either.
"""

import pickle
import sys
import threading

import cloudpickle
import msgpack
import numpy as np
import pyarrow as pa

from .task import KeyRef

PICKLE_PROTOCOL = 5
_PLAIN = (int, float, str, bytes, bool, type(None))  # exact types msgpack keeps as they are
PLAIN_TYPES = frozenset(_PLAIN)
PLAIN_HEADER_BYTES = 64 * 2**10  # longer str / bytes travel as payloads, not in the header
PAGE = 4096
ALIGNED_COPY_BYTES = 2**20  # from this size on, serialize_into aligns the copy to the source


class Serialized:
    """A value in wire form: ``meta`` (msgpack-able dict) and ``payloads``.

    On the sending side each payload is a list of buffer pieces; on the receiving side it is
    a single ``pyarrow.Buffer`` holding those pieces back to back.
    """

    __slots__ = ("meta", "payloads")

    def __init__(self, meta, payloads):
        self.meta = meta
        self.payloads = payloads

    @property
    def nbytes(self):
        payloads = self.payloads
        if len(payloads) == 1 and type(payloads[0]) is pa.Buffer:  # (as most arrive)
            return payloads[0].size
        return sum(payload_nbytes(p) for p in payloads)

    def __repr__(self):
        return f"<Serialized {self.meta.get('kind')} {self.nbytes} bytes>"


def payload_nbytes(payload):
    if type(payload) is pa.Buffer:  # as received
        return payload.size
    if isinstance(payload, list):
        return sum(memoryview(piece).nbytes for piece in payload)
    return memoryview(payload).nbytes


def serialize(value):
    """Turn ``value`` into a :class:`Serialized` without copying array memory where possible.

    Raises
    ------
    TypeError
        The value cannot be pickled; the message names its type and the reason.
    """
    if is_plain(value):
        if type(value) is bytes and len(value) > PLAIN_HEADER_BYTES:
            return Serialized({"kind": "bytes"}, [[value]])
        if type(value) is str and len(value) > PLAIN_HEADER_BYTES:
            return Serialized({"kind": "str"}, [[value.encode("utf-8", "surrogatepass")]])
        return Serialized({"kind": "plain", "value": value}, [])
    if type(value) is np.ndarray and _tensor_compatible(value):
        return _serialize_tensor(value)
    if isinstance(value, (pa.Table, pa.RecordBatch)):
        return _serialize_arrow(value)
    return _serialize_pickle(value)


def serialize_args(args_per_call):
    """The argument tuples of a batch of calls. Where every argument is plain or a
    :class:`~d3arrow.task.KeyRef` (a map over numbers, or over values the workers hold)
    they travel as msgpack, each KeyRef as its key with its place noted beside: several
    times cheaper than pickling KeyRefs, and read back with no unpickling. Else pickled
    as any value."""
    keys = []  # f(x) over values the workers hold (a map over RemoteData): only keys travel
    for args in args_per_call:
        if len(args) != 1 or not isinstance(args[0], KeyRef):
            break
        keys.append(args[0].key)
    else:
        return serialize_keys(keys)
    places = []  # (call, argument) of each KeyRef
    for i, args in enumerate(args_per_call):
        for j, arg in enumerate(args):
            if isinstance(arg, KeyRef):
                places.append((i, j))
            elif not is_plain(arg):
                return serialize([_picklable(args) for args in args_per_call])
    packed = _packers.args.pack([args_per_call, places])
    return Serialized({"kind": "args"}, [[packed]])


def serialize_keys(keys):
    """The arguments of a batch of f(x) calls over values the workers hold, as x's key per
    call (kind ``keys``: read back by :func:`sole_keys`)."""
    return Serialized({"kind": "keys"}, [[msgpack.packb(keys, use_bin_type=True)]])


def _picklable(args):
    """``args`` with its references as plain KeyRefs (a subclass, RemoteData, refuses to
    be pickled: it is bound to its client)."""
    if any(isinstance(a, KeyRef) and type(a) is not KeyRef for a in args):
        return tuple(KeyRef(a.key) if isinstance(a, KeyRef) else a for a in args)
    return args


def _key_of(ref):
    if not isinstance(ref, KeyRef):  # checked above: cannot happen
        raise TypeError(f"cannot pack {type(ref).__name__}")
    return ref.key


class _Packers(threading.local):
    """This thread's packer of call arguments, made once (``msgpack.packb`` makes one at
    every call: 0.64 against 0.21 us for one call's)."""

    def __init__(self):
        self.args = msgpack.Packer(default=_key_of, use_bin_type=True)


_packers = _Packers()


def sole_keys(serialized):
    """The keys of a batch whose calls each take one value the worker holds (kind
    ``keys``, see :func:`serialize_args`): call ``i`` needs key ``i`` alone."""
    keys = msgpack.unpackb(_as_buffer(serialized.payloads[0]), raw=False)
    if type(keys) is not list or not all(type(key) is str for key in keys):
        raise ValueError("malformed call arguments: a list of keys expected")
    return keys


def _unpack_args(packed):
    try:
        args_per_call, places = msgpack.unpackb(packed, raw=False)
        for i, j in places:
            args_per_call[i][j] = KeyRef(args_per_call[i][j])
    except (ValueError, TypeError, IndexError) as e:
        raise ValueError(f"malformed call arguments: {type(e).__name__}: {e}") from None
    return args_per_call


def deserialize(serialized):
    """Rebuild the value; arrays and Arrow data are views of the received buffers."""
    meta = serialized.meta
    buffers = [_as_buffer(p) for p in serialized.payloads]
    kind = meta.get("kind")
    if kind == "plain":
        return meta["value"]
    if kind == "bytes":
        return buffers[0].to_pybytes()
    if kind == "str":
        return str(memoryview(buffers[0]), "utf-8", "surrogatepass")
    if kind == "tensor":
        return pa.ipc.read_tensor(pa.BufferReader(buffers[0])).to_numpy()
    if kind == "arrow":
        table = pa.ipc.open_stream(buffers[0]).read_all()
        if meta.get("type") == "batch":
            batches = table.to_batches()
            return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
        return table
    if kind == "pickle":
        return pickle.loads(buffers[0], buffers=buffers[1:])
    if kind == "args":  # lists where the caller had tuples: the worker unpacks them
        return _unpack_args(buffers[0])
    if kind == "keys":
        return [[KeyRef(key)] for key in sole_keys(serialized)]
    raise ValueError(f"unknown serialization kind {kind!r}")


def is_plain(value):
    """Whether msgpack carries ``value`` as it is (same type, same value)."""
    return type(value) in _PLAIN and (type(value) is not int or -2**63 <= value < 2**64)


def nbytes(value):
    """Bytes a value occupies, as far as we can tell cheaply (used for placement)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (pa.Table, pa.RecordBatch, pa.Buffer)):
        return int(value.nbytes if not isinstance(value, pa.Buffer) else value.size)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return sys.getsizeof(value)


SMALL_TENSOR_BYTES = 4096


def _tensor_compatible(array):
    # Arrow tensors have no byte order, no bool (bit-packed in Arrow) and no complex,
    # datetime, string or object types.
    return array.dtype.byteorder in "=|" and array.dtype.kind in "iuf" and not array.dtype.fields


def _serialize_tensor(array):
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    if array.nbytes <= SMALL_TENSOR_BYTES:  # one message, body copied: cheaper than a split
        return Serialized({"kind": "tensor"}, [[_small_tensor_metadata(array)
                                                + array.tobytes(order="A")]])
    tensor = pa.Tensor.from_numpy(array)
    metadata = _tensor_ipc_metadata(tensor, array.nbytes)
    body = memoryview(array.reshape(-1, order="A").view(np.uint8)) if array.nbytes else b""
    return Serialized({"kind": "tensor"}, [[metadata, body]])


def _small_tensor_metadata(array):
    """The IPC metadata of a small tensor, made once per dtype, shape and layout: for
    tiny results (a reduction's) Arrow's writer costs more than everything else."""
    key = (array.dtype.str, array.shape, array.strides)
    metadata = _small_metadata.get(key)
    if metadata is None:
        if len(_small_metadata) >= 1024:
            _small_metadata.clear()
        metadata = _small_metadata[key] = _tensor_ipc_metadata(
            pa.Tensor.from_numpy(array), array.nbytes).to_pybytes()
    return metadata


_small_metadata = {}


def _tensor_ipc_metadata(tensor, body_nbytes):
    """The IPC message that precedes a tensor's body, without writing (copying) the body.

    Arrow writes the metadata, then the unpadded body; a writer sized for the metadata alone
    takes the first and refuses the second, which is exactly the part we send from the
    array's own memory.
    """
    size = pa.ipc.get_tensor_size(tensor) - body_nbytes
    metadata = pa.allocate_buffer(size)
    try:
        pa.ipc.write_tensor(tensor, pa.FixedSizeBufferWriter(metadata))
    except OSError:
        if body_nbytes == 0:
            raise
    return metadata


def _serialize_arrow(data):
    sink = pa.BufferOutputStream()
    write_arrow_stream(sink, data)
    return Serialized(arrow_meta(data), [[sink.getvalue()]])


def arrow_meta(data):
    """The meta of an Arrow table or record batch written by :func:`write_arrow_stream`."""
    return {"kind": "arrow", "type": "batch" if isinstance(data, pa.RecordBatch) else "table"}


def _serialize_pickle(value):
    buffers = []
    try:
        inband = cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except Exception as e:
        raise TypeError(
            f"cannot serialize {type(value).__name__} object {_short_repr(value)}: "
            f"{type(e).__name__}: {e}"
        ) from e
    payloads = [[inband]]
    for buffer in buffers:
        try:
            payloads.append([buffer.raw()])
        except BufferError:  # non-contiguous out-of-band buffer: one copy to make it contiguous
            payloads.append([memoryview(bytes(buffer))])
    return Serialized({"kind": "pickle"}, payloads)


def _as_buffer(payload):
    if isinstance(payload, list):  # sending-side form, deserialized locally
        if len(payload) == 1:
            return pa.py_buffer(payload[0])
        return pa.py_buffer(b"".join(memoryview(p).cast("B") for p in payload))
    return payload if isinstance(payload, pa.Buffer) else pa.py_buffer(payload)


def _short_repr(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_shareable(value):
    """Whether ``value`` has a one-buffer Arrow form that readers can use in place."""
    return (type(value) is np.ndarray and _tensor_compatible(value)) or isinstance(
        value, (pa.Table, pa.RecordBatch))


def serialize_into(value, allocate):
    """Write a shareable value's one-payload form into ``allocate(nbytes)``; one copy.

    ``allocate`` returns a mutable ``pyarrow.Buffer``. Returns ``(meta, buffer)``; the
    buffer may be a slice of the allocation.
    """
    if isinstance(value, np.ndarray):
        (pieces,) = serialize(value).payloads
        if len(pieces) == 1:  # a small tensor, already one message
            pieces = [b"", pieces[0]]
        metadata, body = pieces
        size = len(metadata) + len(body)
        if len(body) < ALIGNED_COPY_BYTES:
            buffer = allocate(size)
        else:
            # Give the body the same offset within a page as the source: a large memcpy
            # between buffers that disagree on it runs at a third of the speed here.
            space = allocate(size + PAGE)
            source = np.frombuffer(body, dtype=np.uint8).ctypes.data
            skew = (source - space.address - len(metadata)) % PAGE
            buffer = pa.py_buffer(memoryview(space)[skew:skew + size])  # slice() is read-only
        target = np.frombuffer(buffer, dtype=np.uint8)
        target[:len(metadata)] = np.frombuffer(metadata, dtype=np.uint8)
        target[len(metadata):] = np.frombuffer(body, dtype=np.uint8)
        return {"kind": "tensor"}, buffer
    sizer = pa.MockOutputStream()
    write_arrow_stream(sizer, value)
    buffer = allocate(sizer.size())
    write_arrow_stream(pa.FixedSizeBufferWriter(buffer), value)
    return arrow_meta(value), buffer


def write_arrow_stream(sink, data):
    """Write an Arrow table or record batch as an IPC stream, from its own buffers."""
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data) if isinstance(data, pa.RecordBatch) else writer.write_table(data)
