"""Worker ops: data, compute, peer-to-peer fetch, errors. Real servers, one loop."""

import asyncio
import operator

import numpy as np

from conftest import gen_cluster
from d3arrow.center_link import UPDATE_BATCH_SECONDS
from d3arrow.references import RELEASE_DELAY
from d3arrow.core import rebuild_error
from d3arrow.serialize import deserialize, serialize, serialize_args
from d3arrow.task import KeyRef


def calls(*tasks):
    """compute() fields for tasks given as ``(key, args, kwargs, needed)``."""
    return {"keys": [t[0] for t in tasks], "args": serialize([t[1] for t in tasks]),
            "kwargs": serialize([t[2] for t in tasks]), "needed": [t[3] for t in tasks]}


def task(key, *args, needed=(), **kwargs):
    return key, args, kwargs, list(needed)


@gen_cluster(n_workers=1)
async def test_set_get_delete_report_to_the_center(center, workers, pool):
    (w,) = workers
    rpc, crpc = pool.rpc(w.address), pool.rpc(center.address)
    await rpc.update_data(data={"x": serialize(np.arange(5)), "y": serialize("text")})
    reply = await rpc.get_data(keys=["x", "y"])
    np.testing.assert_array_equal(deserialize(reply["data"]["x"]), np.arange(5))
    assert deserialize(reply["data"]["y"]) == "text"
    assert (await crpc.who_has(keys=["x"]))["who_has"] == {"x": [w.address]}
    assert (await rpc.delete_data(keys=["x", "nope"]))["keys"] == ["x"]
    assert (await crpc.who_has(keys=["x"]))["who_has"] == {"x": []}
    reply = await rpc.get_data(keys=["x", "y"])
    assert reply["status"] == "missing-data" and reply["keys"] == ["x"]
    assert list(reply["data"]) == ["y"]


@gen_cluster(n_workers=1)
async def test_a_result_freed_before_its_batch_never_reaches_the_center(center, workers, pool):
    """Results reach the center in batches; one freed meanwhile (a caller's apply(f).get()
    in a loop frees each result a few ms later) is never told, and leaves no stale holder."""
    (w,) = workers
    rpc, crpc = pool.rpc(w.address), pool.rpc(center.address)
    told = center.requests["add_keys"]
    await rpc.compute(function=serialize(operator.add), **calls(task("freed", 1, 2)))
    await asyncio.sleep(RELEASE_DELAY)  # as a client freeing what was dropped
    await rpc.delete_data(keys=["freed"])
    await rpc.compute(function=serialize(operator.add), **calls(task("kept", 3, 4)))
    async with asyncio.timeout(5):  # the kept one is told with no one asking for it
        while (await crpc.who_has(keys=["kept"]))["who_has"]["kept"] != [w.address]:
            await asyncio.sleep(UPDATE_BATCH_SECONDS / 5)
    assert center.requests["add_keys"] == told + 1
    assert (await crpc.who_has(keys=["freed"]))["who_has"] == {"freed": []}


@gen_cluster(n_workers=3)
async def test_compute_fetches_inputs_from_two_other_workers(center, workers, pool):
    a, b, c = workers
    await pool.rpc(a.address).update_data(data={"x": serialize(np.full(1000, 2.0))})
    await pool.rpc(b.address).update_data(data={"y": serialize(np.full(1000, 3.0))})
    reply = await pool.rpc(c.address).compute(
        function=serialize(operator.add),
        **calls(task("z", KeyRef("x"), KeyRef("y"), needed=["x", "y"])))
    assert reply["nbytes"] == [8000] and "failed" not in reply
    np.testing.assert_array_equal(c.values["z"], np.full(1000, 5.0))
    # the replicas were reported to the center before c replied; its result soon after
    await pool.rpc(c.address).told()
    who_has = (await pool.rpc(center.address).who_has(keys=["x", "y", "z"]))["who_has"]
    assert sorted(who_has["x"]) == sorted([a.address, c.address])
    assert sorted(who_has["y"]) == sorted([b.address, c.address])
    assert who_has["z"] == [c.address]


@gen_cluster(n_workers=2)
async def test_keyrefs_nested_in_lists_and_kwargs(center, workers, pool):
    a, b = workers
    await pool.rpc(a.address).update_data(data={"p": serialize(1), "q": serialize(2)})
    reply = await pool.rpc(b.address).compute(
        function=serialize(lambda xs, scale: sum(xs) * scale),
        **calls(task("s", [KeyRef("p"), KeyRef("q"), 3], needed=["p", "q"], scale=KeyRef("q"))))
    assert reply["nbytes"][0] is not None and "failed" not in reply
    assert b.values["s"] == 12


@gen_cluster(n_workers=2)
async def test_calls_of_one_held_value_each_name_their_inputs_by_key_alone(
        center, workers, pool):
    a, b = workers
    await pool.rpc(a.address).update_data(data={"p": serialize(1), "q": serialize(2)})
    reply = await pool.rpc(b.address).compute(  # no "needed": the keys say it all
        function=serialize(lambda x: x * 10), keys=["r", "s"],
        args=serialize_args([(KeyRef("p"),), (KeyRef("q"),)]))
    assert reply["small"] == {0: 10, 1: 20} and "failed" not in reply  # back with the reply
    assert (b.values["r"], b.values["s"]) == (10, 20)  # fetched from a first


@gen_cluster(n_workers=1)
async def test_missing_input_is_reported_by_key(center, workers, pool):
    (w,) = workers
    reply = await pool.rpc(w.address).compute(
        function=serialize(len), **calls(task("r", KeyRef("ghost"), needed=["ghost"])))
    assert reply["nbytes"] == [None]
    assert reply["failed"][0] == {"status": "missing-data", "keys": ["ghost"],
                                 "unreachable": []}
    assert "r" not in w.values


@gen_cluster(n_workers=1)
async def test_user_exception_carries_its_traceback(center, workers, pool):
    def broken(x):
        return x / 0

    (w,) = workers
    reply = await pool.rpc(w.address).compute(function=serialize(broken), **calls(task("r", 1)))
    assert reply["nbytes"] == [None]
    result = reply["failed"][0]
    assert result["status"] == "error" and result["type"] == "builtins.ZeroDivisionError"
    assert "in broken" in result["traceback"]  # cloudpickle hides the file of by-value code
    error = rebuild_error(result)
    assert isinstance(error, ZeroDivisionError) and "in broken" in error.__cause__.text
    reply = await pool.rpc(w.address).compute(function=serialize(abs), **calls(task("ok", -1)))
    assert w.values["ok"] == 1  # the worker goes on


@gen_cluster(n_workers=1)
async def test_function_that_does_not_unpickle_is_an_error_per_task(center, workers, pool):
    (w,) = workers
    bogus = serialize(len)
    bogus.payloads = [[b"not a pickle"]]
    reply = await pool.rpc(w.address).compute(function=bogus, **calls(task("a"), task("b")))
    assert reply["nbytes"] == [None, None]
    assert [r["status"] for r in reply["failed"].values()] == ["error", "error"]
    assert "UnpicklingError" in reply["failed"][0]["type"]


@gen_cluster(n_workers=1, ncores=1)
async def test_slow_computation_does_not_block_serving_data(center, workers, pool):
    import time

    (w,) = workers
    await pool.rpc(w.address).update_data(data={"x": serialize(7)})
    slow = asyncio.ensure_future(pool.rpc(w.address).compute(
        function=serialize(lambda: time.sleep(1.0)), **calls(task("sleep"))))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    reply = await pool.rpc(w.address).get_data(keys=["x"])
    elapsed = asyncio.get_running_loop().time() - started
    assert deserialize(reply["data"]["x"]) == 7 and not slow.done()
    assert elapsed < 0.9  # answered while the only compute thread was busy
    await slow


@gen_cluster(n_workers=2)
async def test_concurrent_needs_share_one_transfer(center, workers, pool):
    a, b = workers
    await pool.rpc(a.address).update_data(data={"x": serialize(np.ones(10))})
    served = []
    original = a.get_data
    a.handlers["get_data"] = lambda **kw: served.append(kw["keys"]) or original(**kw)
    await asyncio.gather(*(pool.rpc(b.address).compute(
        function=serialize(np.sum), **calls(task(f"s{i}", KeyRef("x"), needed=["x"])))
        for i in range(5)))
    assert served == [["x"]]
    assert [b.values[f"s{i}"] for i in range(5)] == [10.0] * 5
