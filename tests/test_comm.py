"""Framed connections over real loopback sockets.

``check_comm`` is the contract every transport must meet; it runs against each one.
"""

import asyncio
import os
import socket

import numpy as np
import pytest

from d3arrow.comm import Listener, connect
from d3arrow.errors import CommClosedError
from d3arrow.eventloop import new_event_loop, run
from d3arrow.security import Security
from d3arrow.serialize import deserialize, serialize


async def tcp_pair():
    """(client comm, server comm, listener) over 127.0.0.1."""
    accepted = asyncio.Queue()

    async def handle(comm):
        await accepted.put(comm)
        await asyncio.Event().wait()  # keep the connection until the listener stops

    listener = Listener(handle)
    await listener.start("127.0.0.1", 0)
    client = await connect(listener.address)
    server = await asyncio.wait_for(accepted.get(), 5)
    return client, server, listener


async def check_comm(make_pair):
    client, server, listener = await make_pair()
    try:
        # small messages both ways, order kept
        for i in range(100):
            await client.send({"op": "ping", "i": i})
        assert [(await server.recv())["i"] for _ in range(100)] == list(range(100))
        await server.send({"status": "OK", "text": "héllo", "raw": b"\x00\xff"})
        assert await client.recv() == {"status": "OK", "text": "héllo", "raw": b"\x00\xff"}

        # a large value and a small one in one message, several messages in flight at once
        big = np.random.default_rng(1).random(4 * 2**20 // 8)
        sends = [client.send({"op": "data", "n": n, "v": serialize(big * n),
                              "w": serialize([n])}) for n in range(3)]
        received = []
        async def receive():
            for _ in range(3):
                received.append(await server.recv())
        await asyncio.gather(receive(), *sends)
        for n, msg in enumerate(received):
            assert msg["n"] == n and deserialize(msg["w"]) == [n]
            np.testing.assert_array_equal(deserialize(msg["v"]), big * n)

        # closing one side makes the other's recv raise, never hang
        await client.close()
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(server.recv(), 5)
        assert client.closed
        with pytest.raises(CommClosedError):
            await client.send({"op": "late"})
    finally:
        client.abort()
        await listener.stop()


def test_tcp_comm_meets_the_contract():
    run(check_comm(tcp_pair))


def test_connect_to_a_closed_port_is_a_clear_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def main():
        with pytest.raises(CommClosedError, match=f"cannot connect to 127.0.0.1:{port}"):
            await connect(f"127.0.0.1:{port}")
    run(main())


def test_a_server_whose_unix_socket_name_is_taken_still_serves_over_tcp(monkeypatch):
    """The Unix socket is for callers on the host that want it: if its name is taken, the
    server starts without it (callers stay on TCP) rather than not at all."""
    class Taken:
        hex = "taken-name-0123"
    monkeypatch.setattr("d3arrow.comm.uuid.uuid4", lambda: Taken)
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind("\0d3arrow-%d-taken-name-0" % os.getpid())  # the name it would take

    async def echo(comm):
        await comm.send(await comm.recv())

    async def main():
        listener = Listener(echo)
        address = await listener.start("127.0.0.1", 0, local=True)
        try:
            assert listener.local_name is None
            comm = await connect(address)
            await comm.send({"op": "ping"})
            assert await comm.recv() == {"op": "ping"}
            comm.abort()
        finally:
            await listener.stop()
    try:
        run(main())
    finally:
        squatter.close()


def test_a_connect_cancelled_during_its_handshake_leaves_nothing_open():
    """A peer that accepts and never answers (frozen): the client closing cancels the
    connect mid-handshake, and the loop must still close (an open transport: EBUSY)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    loop = new_event_loop()
    try:
        async def main():
            task = asyncio.ensure_future(connect(
                "127.0.0.1:%d" % silent.getsockname()[1], security=Security(token="t" * 32)))
            await asyncio.sleep(0.2)  # connected, waiting for the handshake's answer
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        loop.run_until_complete(main())
    finally:
        silent.close()
        loop.close()  # raised OSError (EBUSY) with the transport left open


def test_garbage_framing_closes_only_that_connection():
    async def main():
        client, server, listener = await tcp_pair()
        try:
            host, port = listener.address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"\xff" * 64)  # announces a header of ~2**64 bytes
            await writer.drain()
            last_words = await asyncio.wait_for(reader.read(), 5)  # then the listener hangs up
            assert b"ProtocolError" in last_words and b"announced" in last_words
            writer.close()
            await writer.wait_closed()
            await client.send({"op": "still-alive"})
            assert (await server.recv())["op"] == "still-alive"
        finally:
            client.abort()
            await listener.stop()
    run(main())
