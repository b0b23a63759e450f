"""Values to Arrow buffers and back, without copying array memory."""

import threading

import msgpack
import numpy as np
import pyarrow as pa
import pytest

from d3arrow.protocol import MessageReader, dumps
from d3arrow.serialize import Serialized, deserialize, serialize, serialize_args
from d3arrow.task import KeyRef


def over_the_wire(value):
    """Serialize, frame, decode and deserialize as a receiving worker would."""
    data = b"".join(bytes(memoryview(f).cast("B")) for f in dumps({"v": serialize(value)}))
    reader = MessageReader()
    out, pos = [], 0
    while pos < len(data):
        buf = reader.get_buffer()
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        out += reader.buffer_updated(n)
    (msg,) = out
    return deserialize(msg["v"]), msg["v"]


ARRAYS = {
    "float64-2d": np.arange(12.0).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "0-d": np.array(3.5),
    "empty": np.zeros((0, 3), dtype="i4"),
    "non-contiguous": np.arange(40, dtype="i8").reshape(4, 10)[:, ::3],
    "big-endian": np.arange(6, dtype=">f8"),
    "uint8": np.arange(255, dtype="u1"),
    "float16": np.linspace(0, 1, 7, dtype="f2"),
    "bool": np.array([True, False, True]),
    "complex": np.array([1 + 2j, 3 - 4j]),
    "datetime": np.array(["2026-01-01", "2026-11-27"], dtype="M8[D]"),
    "unicode": np.array(["ab", "cde"]),
    "structured": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "object": np.array([{"a": 1}, None], dtype=object),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_arrays_round_trip_with_dtype_and_shape(name):
    array = ARRAYS[name]
    got, _ = over_the_wire(array)
    assert got.dtype == array.dtype and got.shape == array.shape
    if array.dtype.kind == "O":
        assert list(got) == list(array)
    else:
        np.testing.assert_array_equal(got, array)


def test_arrays_travel_as_arrow_tensors_and_are_views_of_the_received_buffer():
    array = np.random.default_rng(0).random((500, 300))
    got, wire_value = over_the_wire(array)
    assert wire_value.meta == {"kind": "tensor"}
    (buffer,) = wire_value.payloads
    start = buffer.address
    assert start <= got.ctypes.data and got.ctypes.data + got.nbytes <= start + buffer.size
    assert not got.flags.writeable
    np.testing.assert_array_equal(got, array)


def test_sending_side_does_not_copy_the_array():
    array = np.arange(1000.0)
    (payload,) = serialize(array).payloads
    metadata, body = payload
    assert np.shares_memory(np.frombuffer(body, dtype=np.uint8), array.view(np.uint8))
    assert len(metadata) < 1024


def test_100_megabyte_array():
    array = np.arange(100 * 2**20 // 8, dtype="f8")
    got, _ = over_the_wire(array)
    assert got.nbytes == array.nbytes
    assert got[-1] == array[-1] and got[12345] == 12345


def test_arrow_table_and_record_batch():
    table = pa.table({"a": [1, 2, 3], "b": ["x", None, "z"]})
    got, wire_value = over_the_wire(table)
    assert wire_value.meta["kind"] == "arrow" and got.equals(table)
    batch = table.to_batches()[0]
    got, _ = over_the_wire(batch)
    assert isinstance(got, pa.RecordBatch) and got.equals(batch)


def test_python_objects_and_closures():
    offset = 10
    got, _ = over_the_wire({"f": lambda x: x + offset, "s": {1, 2}, "t": (1, "a")})
    assert got["f"](1) == 11 and got["s"] == {1, 2} and got["t"] == (1, "a")


def test_arrays_inside_objects_go_out_of_band():
    array = np.arange(10_000.0)
    wire_value = serialize({"inner": array})
    assert wire_value.meta == {"kind": "pickle"} and len(wire_value.payloads) == 2
    got, _ = over_the_wire({"inner": array})
    np.testing.assert_array_equal(got["inner"], array)


def test_unpicklable_value_names_its_type():
    with pytest.raises(TypeError, match="cannot serialize lock object"):
        serialize(threading.Lock())


@pytest.mark.parametrize("value", [0, -1, 2**63 - 1, 2**64 - 1, 1.5, float("inf"), "text", "",
                                   b"\x00\xff", True, None])
def test_plain_values_travel_without_pickle(value):
    got, wire_value = over_the_wire(value)
    assert wire_value.meta["kind"] == "plain" and wire_value.payloads == []
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("value", [2**64, -2**63 - 1, (1, 2), [1], np.int64(3), 1 + 2j])
def test_other_small_values_keep_their_type(value):
    got, wire_value = over_the_wire(value)
    assert wire_value.meta["kind"] == "pickle"
    assert got == value and type(got) is type(value)


def _framed(serialized):
    data = b"".join(bytes(memoryview(f).cast("B")) for f in dumps({"v": serialized}))
    reader = MessageReader()
    buf = reader.get_buffer()
    out = []
    while data:
        buf = reader.get_buffer()
        n = min(len(buf), len(data))
        buf[:n], data = data[:n], data[n:]
        out += reader.buffer_updated(n)
    return out[0]["v"]


def test_call_arguments_with_keyrefs_travel_without_pickle():
    calls = [(1, KeyRef("x-1"), "text"), (KeyRef("y"),), (2.5, None, b"raw", True)]
    serialized = serialize_args(calls)
    assert serialized.meta == {"kind": "args"}
    received = deserialize(_framed(serialized))
    assert received == [[1, KeyRef("x-1"), "text"], [KeyRef("y")], [2.5, None, b"raw", True]]
    assert calls[0][1] == KeyRef("x-1")  # the caller's tuples are left as they were
    # anything else is pickled, as any value
    assert serialize_args([(1, (2, 3))]).meta["kind"] == "pickle"
    assert deserialize(serialize_args([(1, (2, 3))])) == [(1, (2, 3))]


def test_calls_of_one_held_value_each_travel_as_their_keys():
    calls = [(KeyRef("x"),), (KeyRef("y"),)]
    serialized = serialize_args(calls)
    assert serialized.meta == {"kind": "keys"}
    assert deserialize(_framed(serialized)) == [[KeyRef("x")], [KeyRef("y")]]
    assert serialize_args([(KeyRef("x"),), (1,)]).meta == {"kind": "args"}  # not all
    bad = Serialized({"kind": "keys"}, [[msgpack.packb(["x", 5])]])
    with pytest.raises(ValueError, match="malformed call arguments"):
        deserialize(bad)


def test_malformed_call_arguments_are_a_clear_error():
    bad = Serialized({"kind": "args"}, [[msgpack.packb([[[1]], [[5, 0]]])]])
    with pytest.raises(ValueError, match="malformed call arguments"):
        deserialize(bad)
