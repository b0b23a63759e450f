"""Hostile and broken input: the decoder and the live servers survive it and say what is wrong.

Two parts: hypothesis drives the pure frame decoder with arbitrary bytes, and a seeded
random-frame stress sends more than 10,000 malformed, truncated, oversized and nonsensical
messages to a live center and worker (real processes), checking that they keep answering
and that their memory stays flat.
"""

import asyncio
import os
import random
import struct

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d3arrow import LocalCluster, Pool
from d3arrow.errors import ProtocolError
from d3arrow.protocol import PREFIX, SERIALIZED_EXT, MessageReader, dumps
from d3arrow.serialize import serialize

LIVE_CASES = int(os.environ.get("D3ARROW_FUZZ_CASES", "10000"))
MAX_PAYLOAD = 2**20  # the decoder's limit in the hypothesis tests


def feed(reader, data, chunks):
    """Push ``data`` through ``reader`` in pieces; the messages, or the ProtocolError raised."""
    out, pos = [], 0
    sizes = iter(chunks)
    while pos < len(data):
        buffer = reader.get_buffer()
        n = min(len(buffer), len(data) - pos, next(sizes, 4096) or 1)
        buffer[:n] = data[pos:pos + n]
        pos += n
        try:
            out.extend(reader.buffer_updated(n))
        except ProtocolError as e:
            return out, e
    return out, None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=50))
def test_arbitrary_bytes_never_break_the_decoder(data, chunks):
    allocated = []

    def allocate(values, lengths):
        allocated.extend(lengths)
        return [bytearray(n) for n in lengths]

    reader = MessageReader(allocate=allocate, max_payload_bytes=MAX_PAYLOAD)
    messages, error = feed(reader, data, chunks)
    assert all(isinstance(m, (dict, ProtocolError)) for m in messages)
    assert error is None or isinstance(error, ProtocolError)
    assert sum(allocated) <= MAX_PAYLOAD  # nothing beyond the limit was ever allocated


frames = st.builds(
    lambda header, payloads: (header, payloads),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2**63, 2**64 - 1),
                                                   st.text(max_size=10),
                                                   st.binary(max_size=10), st.none()),
                    max_size=4),
    st.lists(st.binary(max_size=40), max_size=3))


@settings(max_examples=1000, deadline=None)
@given(frames, st.integers(0, 200), st.randoms(use_true_random=False))
def test_truncated_and_corrupted_frames_are_refused_or_decoded(frame, cut, rnd):
    header, payloads = frame
    value = serialize(payloads[0]) if payloads else None
    if value is not None:
        header = dict(header, value=value)
    data = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in dumps(header)))
    if data and rnd.random() < 0.5:
        data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)  # one flipped bit
    data = data[:len(data) - min(cut, len(data))] if rnd.random() < 0.5 else data
    reader = MessageReader(max_payload_bytes=MAX_PAYLOAD)
    messages, error = feed(reader, bytes(data), [rnd.randint(1, 64) for _ in range(20)])
    assert all(isinstance(m, (dict, ProtocolError)) for m in messages)
    assert error is None or isinstance(error, ProtocolError)


# -- the live servers ---------------------------------------------------------------------------

OPS = ["register", "unregister", "heartbeat", "add_keys", "remove_keys", "who_has", "has_what",
       "ncores", "nbytes", "workers", "get_data", "update_data", "delete_data", "compute",
       "fetch", "keys", "identity", "no-such-op", "", None, 7]


def _junk(rng, depth=0):
    choices = [lambda: rng.randint(-2**63, 2**64 - 1), lambda: rng.random(), lambda: None,
               lambda: rng.choice([True, False]), lambda: rng.randbytes(rng.randint(0, 20)),
               lambda: "".join(rng.choice("ab\x00é:") for _ in range(rng.randint(0, 12)))]
    if depth < 2:
        choices += [lambda: [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    lambda: {str(_junk(rng, 2)): _junk(rng, depth + 1)
                             for _ in range(rng.randint(0, 3))}]
    return rng.choice(choices)()


def _bad_message(rng):
    """A well-framed message whose content is nonsense: the server must answer it."""
    kind = rng.randrange(6)
    if kind == 0:  # a known or unknown op with junk fields
        header = {"op": rng.choice(OPS)}
        for _ in range(rng.randint(0, 4)):
            # (no who_has: a worker would try to reach the junk addresses in it)
            header[rng.choice(["keys", "address", "data", "function", "args", "ncores",
                               "nbytes", "x"])] = _junk(rng)
        return msgpack.packb(header, use_bin_type=True), []
    if kind == 1:  # a header that is not a map
        return msgpack.packb(_junk(rng), use_bin_type=True), []
    if kind == 2:  # undecodable bytes as header
        return rng.randbytes(rng.randint(1, 40)), []
    if kind == 3:  # a serialized value naming payloads that are not there, or junk meta
        ext = msgpack.ExtType(rng.choice([SERIALIZED_EXT, 9]), msgpack.packb(
            [_junk(rng), rng.randint(-2, 5), rng.randint(-2, 5)]))
        return msgpack.packb({"op": rng.choice(OPS), "data": {"k": ext}, "function": ext},
                             use_bin_type=True), []
    if kind == 4:  # a value whose bytes are junk (pickle, tensor, arrow...)
        n = rng.randint(0, 64)
        meta = {"kind": rng.choice(["pickle", "tensor", "arrow", "plain", "shm", "nope"])}
        ext = msgpack.ExtType(SERIALIZED_EXT, msgpack.packb([meta, 0, 1]))
        op = rng.choice(["compute", "update_data", "get_data"])
        header = {"op": op, "keys": ["fuzz"], "data": {"fuzz": ext}, "function": ext,
                  "args": ext}
        return msgpack.packb(header, use_bin_type=True), [rng.randbytes(n)]
    if kind == 5 and rng.random() < 0.3:  # a reply where a request should be
        return msgpack.packb({"status": rng.choice(["OK", "error", "missing-data"]),
                              "keys": [_junk(rng)]}, use_bin_type=True), []
    # valid-looking requests for keys nobody has
    return msgpack.packb({"op": rng.choice(["get_data", "who_has", "delete_data", "fetch"]),
                          "keys": [rng.randbytes(4).hex()]}, use_bin_type=True), []


def _frame(header, payloads):
    return (PREFIX.pack(len(header), len(payloads))
            + struct.pack(f"<{len(payloads)}Q", *map(len, payloads)) + header + b"".join(payloads))


def _broken_stream(rng):
    """Bytes that break the framing: the server must hang up on them (and stay up)."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200))
    if kind == 1:  # absurd lengths
        return PREFIX.pack(rng.choice([2**63, 2**40, 2**27]), 0) + b"x" * 8
    if kind == 2:
        return PREFIX.pack(4, 1) + struct.pack("<Q", 2**62) + b"\x80" * 4
    if kind == 3:  # too many payloads
        return PREFIX.pack(1, 2**40) + b"\x80"
    header, payloads = _bad_message(rng)  # truncated mid-frame, then the connection closes
    data = _frame(header, payloads)
    return data[:rng.randint(0, max(0, len(data) - 1))]


async def _stress(address, rng, cases):
    host, port = address.rsplit(":", 1)
    answered = refused = 0
    reader, writer = await asyncio.open_connection(host, int(port))
    for _ in range(cases):
        if rng.random() < 0.8:  # on the long-lived connection: every message gets a reply
            # sometimes several at once before reading any reply (pipelined, out of turn)
            batch = [_bad_message(rng) for _ in range(rng.choice([1, 1, 1, 3]))]
            writer.write(b"".join(_frame(*message) for message in batch))
            for _ in batch:
                length, n = PREFIX.unpack(await asyncio.wait_for(reader.readexactly(16), 10))
                lengths = struct.unpack(f"<{n}Q", await reader.readexactly(8 * n))
                reply = msgpack.unpackb(await reader.readexactly(length), raw=False,
                                        strict_map_key=False,
                                        ext_hook=lambda code, data: msgpack.ExtType(code, data))
                await reader.readexactly(sum(lengths))
                assert isinstance(reply, dict) and "status" in reply
            answered += len(batch)
        else:  # a connection of its own, which the server must close
            r, w = await asyncio.open_connection(host, int(port))
            w.write(_broken_stream(rng))
            w.write_eof()  # a frame cut short stays cut short
            try:
                await asyncio.wait_for(r.read(), 10)  # maybe an error frame, then EOF
            except ConnectionResetError:
                pass
            w.close()
            await w.wait_closed()
            refused += 1
    writer.close()
    await writer.wait_closed()
    return answered, refused


@pytest.mark.timeout(300)
def test_live_servers_survive_ten_thousand_hostile_messages():
    rng = random.Random(20261127)
    with LocalCluster(n_workers=1, ncores=1, auth_token=False) as cluster:  # open: fuzz it
        processes = {"center": psutil.Process(cluster.center_process.pid),
                     "worker": psutil.Process(cluster.worker_processes[0].pid)}
        targets = {"center": cluster.center_address, "worker": cluster.worker_addresses[0]}

        def run_cases(cases):
            return {name: asyncio.run(_stress(address, rng, cases))
                    for name, address in targets.items()}

        run_cases(500)  # warm up: allocators and caches reach their working size
        rss_before = {name: p.memory_info().rss for name, p in processes.items()}
        counts = run_cases(LIVE_CASES // 2)
        with Pool(cluster.center_address) as pool:  # still serving real work, correctly
            assert pool.gather(pool.map(lambda x: x + 1, range(10))) == list(range(1, 11))
            pool.client.delete(pool.client.has_what()[cluster.worker_addresses[0]])
        rss_after = {name: p.memory_info().rss for name, p in processes.items()}
    total = sum(a + r for a, r in counts.values())
    assert total >= LIVE_CASES
    assert all(a > 0 and r > 0 for a, r in counts.values())
    for name in processes:
        growth = rss_after[name] - rss_before[name]
        assert growth < 16 * 2**20, f"{name} grew by {growth / 2**20:.1f} MiB"
    print(f"fuzz: {total} cases ({counts}); RSS growth MiB: "
          + ", ".join(f"{n} {(rss_after[n] - rss_before[n]) / 2**20:.1f}" for n in processes))
