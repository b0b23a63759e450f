"""The wire format and its decoder, on plain bytes (no sockets)."""

import struct

import msgpack
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d3arrow.errors import ProtocolError
from d3arrow.protocol import INLINE_BYTES, INLINE_EXT, PREFIX, MessageReader, dumps
from d3arrow.serialize import deserialize, serialize, serialize_args


def wire(*messages):
    return b"".join(bytes(memoryview(f).cast("B")) for m in messages for f in dumps(m))


def feed(reader, data, chunk):
    """Push ``data`` through the reader in pieces of at most ``chunk`` bytes."""
    out, pos = [], 0
    while pos < len(data):
        buf = reader.get_buffer()
        n = min(len(buf), chunk, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        out += reader.buffer_updated(n)
    return out


headers = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), headers, max_size=5), min_size=1,
                max_size=4),
       st.integers(1, 70000))
def test_messages_survive_any_chunking(messages, chunk):
    assert feed(MessageReader(), wire(*messages), chunk) == messages


@pytest.mark.parametrize("chunk", [1, 13, 4096, 1 << 20])
def test_values_arrive_in_their_own_buffers(chunk):
    a = np.arange(50_000, dtype="f8")
    msg = {"op": "x", "data": {"a": serialize(a), "b": serialize({"k": [1, 2]}),
                               "empty": serialize(np.zeros(0))}}
    (got,) = feed(MessageReader(), wire(msg), chunk)
    assert got["op"] == "x"
    np.testing.assert_array_equal(deserialize(got["data"]["a"]), a)
    assert deserialize(got["data"]["b"]) == {"k": [1, 2]}
    assert deserialize(got["data"]["empty"]).shape == (0,)


@pytest.mark.parametrize("chunk", [7, 100, 1000, 4096, 1 << 16])
def test_small_messages_with_values_read_many_at_a_time_each_keep_their_own(chunk):
    arrays = [np.arange(i * 10, dtype="f8") for i in range(6)]  # one without a payload
    messages = [{"op": "x", "i": i, "a": serialize(a), "b": serialize(f"v{i}")}
                for i, a in enumerate(arrays)]
    got = feed(MessageReader(), wire(*messages), chunk)
    assert [m["i"] for m in got] == list(range(6))
    for m, a in zip(got, arrays):
        np.testing.assert_array_equal(deserialize(m["a"]), a)
        assert deserialize(m["b"]) == f"v{m['i']}"


def test_absurd_header_length_is_refused_before_allocating():
    reader = MessageReader()
    with pytest.raises(ProtocolError, match="header of"):
        feed(reader, PREFIX.pack(2**62, 0), 100)


def test_absurd_payload_length_is_refused_before_allocating():
    allocations = []
    reader = MessageReader(allocate=lambda values, lengths: allocations.append(lengths))
    head = msgpack.packb({"op": "x"})
    data = PREFIX.pack(len(head), 1) + struct.pack("<Q", 2**60) + head
    with pytest.raises(ProtocolError, match="payload bytes announced"):
        feed(reader, data, 100)
    assert allocations == []


def test_too_many_payloads_is_refused():
    with pytest.raises(ProtocolError, match="payloads announced"):
        feed(MessageReader(), PREFIX.pack(10, 2**40), 100)


def test_undecodable_header_is_reported_and_the_stream_goes_on():
    garbage = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    data = PREFIX.pack(len(garbage), 0) + garbage + wire({"op": "next"})
    first, second = feed(MessageReader(), data, 7)
    assert isinstance(first, ProtocolError) and "undecodable" in str(first)
    assert second == {"op": "next"}


def test_header_that_is_not_a_map_is_reported():
    head = msgpack.packb([1, 2, 3])
    (got,) = feed(MessageReader(), PREFIX.pack(len(head), 0) + head, 100)
    assert isinstance(got, ProtocolError) and "must be a map" in str(got)


def test_value_naming_missing_payloads_is_reported():
    ext = msgpack.ExtType(1, msgpack.packb([{"kind": "pickle"}, 0, 5]))
    head = msgpack.packb({"op": "x", "v": ext})
    (got,) = feed(MessageReader(), PREFIX.pack(len(head), 0) + head, 100)
    assert isinstance(got, ProtocolError) and "payloads" in str(got)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_small_pickles_travel_inside_the_header_arrays_and_big_ones_after_it(chunk):
    small, big = {"k": [1, 2]}, list(range(INLINE_BYTES))
    array = np.arange(4, dtype="i8")  # small, but an array keeps its aligned buffer
    msg = {"op": "x", "small": serialize(small), "args": serialize_args([(1, "a")]),
           "big": serialize(big), "array": serialize(array)}
    _, n_payloads = PREFIX.unpack_from(dumps(msg)[0])
    assert n_payloads == 2  # big's and array's; small and args are in the header
    (got,) = feed(MessageReader(), wire(msg), chunk)
    assert deserialize(got["small"]) == small
    assert type(got["small"].payloads[0]) is pa.Buffer  # as any received payload
    assert deserialize(got["big"]) == big
    np.testing.assert_array_equal(deserialize(got["array"]), array)
    assert got["args"].payloads[0].to_pybytes() == serialize_args([(1, "a")]).payloads[0][0]


def test_an_inline_value_that_is_not_bytes_is_reported():
    ext = msgpack.ExtType(INLINE_EXT, msgpack.packb([{"kind": "pickle"}, 5]))
    head = msgpack.packb({"op": "x", "v": ext})
    data = PREFIX.pack(len(head), 0) + head + wire({"op": "next"})
    first, second = feed(MessageReader(), data, 100)
    assert isinstance(first, ProtocolError) and "inline payload is not bytes" in str(first)
    assert second == {"op": "next"}


def test_unknown_objects_in_headers_are_refused_with_a_hint():
    with pytest.raises(TypeError, match="serialize"):
        dumps({"op": "x", "v": object()})
