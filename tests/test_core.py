"""Op dispatch, error replies and the connection pool, against a real server."""

import asyncio
import threading

import pytest

from d3arrow.core import ConnectionPool, Server
from d3arrow.errors import ProtocolError, RemoteError
from d3arrow.eventloop import run
from d3arrow.protocol import PREFIX


class Echo(Server):
    def __init__(self):
        super().__init__()
        self.handlers = {"echo": self.echo, "fail": self.fail, "slow": self.slow}

    def echo(self, *, value):
        return {"value": value}

    def fail(self, *, kind):
        if kind == "value":
            raise ValueError("bad value 42")
        error = LookupError("unpicklable")
        error.lock = threading.Lock()  # cannot be pickled: arrives as a RemoteError
        raise error

    async def slow(self, *, seconds):
        await asyncio.sleep(seconds)
        return {}


def with_server(test):
    def wrapper():
        async def main():
            server = Echo()
            await server.listen("127.0.0.1", 0)
            pool = ConnectionPool()
            try:
                await asyncio.wait_for(test(server, pool), 30)
            finally:
                pool.close()
                await server.close()
        run(main())
    wrapper.__name__ = test.__name__
    return wrapper


@with_server
async def test_rpc_calls_a_handler_and_reuses_the_connection(server, pool):
    rpc = pool.rpc(server.address)
    assert (await rpc.echo(value=[1, "a"]))["value"] == [1, "a"]
    assert (await rpc.echo(value=2)) == {"value": 2, "status": "OK"}
    assert len(pool._idle[server.address]) == 1


@with_server
async def test_unknown_operation_names_it_and_the_server_goes_on(server, pool):
    with pytest.raises(ProtocolError, match="unknown operation 'nope'"):
        await pool.rpc(server.address).nope()
    assert (await pool.rpc(server.address).echo(value=1))["value"] == 1


@with_server
async def test_missing_or_extra_fields_are_an_error_reply(server, pool):
    with pytest.raises(TypeError, match="value"):
        await pool.rpc(server.address).echo()
    with pytest.raises(TypeError, match="unexpected"):
        await pool.rpc(server.address).echo(value=1, unexpected=2)


@with_server
async def test_handler_exception_comes_back_with_remote_traceback(server, pool):
    with pytest.raises(ValueError, match="bad value 42") as info:
        await pool.rpc(server.address).fail(kind="value")
    assert "raise ValueError" in info.value.__cause__.text


@with_server
async def test_unpicklable_exception_arrives_as_remote_error(server, pool):
    with pytest.raises(RemoteError, match="LookupError: unpicklable") as info:
        await pool.rpc(server.address).fail(kind="local")
    assert "raise error" in info.value.remote_traceback


@with_server
async def test_message_without_op_is_an_error_reply(server, pool):
    comm = await pool.acquire(server.address)
    await comm.send({"value": 1})
    reply = await comm.recv()
    assert reply["status"] == "error" and "unknown operation None" in reply["message"]


@with_server
async def test_undecodable_header_gets_an_error_reply(server, pool):
    host, port = server.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PREFIX.pack(3, 0) + b"\xc1\xc1\xc1")
    prefix = await reader.readexactly(PREFIX.size)
    header_len, n = PREFIX.unpack(prefix)
    await reader.readexactly(8 * n + header_len)  # the error reply arrived in full
    writer.close()
    assert (await pool.rpc(server.address).echo(value=1))["value"] == 1


@with_server
async def test_request_timeout_is_a_timeout_error_naming_the_op(server, pool):
    with pytest.raises(TimeoutError, match="'slow'"):
        await pool.rpc(server.address, timeout=0.1).slow(seconds=5)
    assert (await pool.rpc(server.address).echo(value=3))["value"] == 3
