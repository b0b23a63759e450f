"""numpy makes a compute thread's big arrays in the shared arena; the store takes them as
they lie. Real shared memory, real threads, real worker processes."""

import asyncio
import gc
import operator
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import gen_cluster, wait_until
from d3arrow import LocalCluster, Pool
from d3arrow import numpy_allocator
from d3arrow import store as store_module
from d3arrow.arena import RAW_HEADER
from d3arrow.serialize import serialize
from d3arrow.store import SharedStore, StoreRef
from d3arrow.task import KeyRef
from test_worker import calls, task

MiB = 2**20


@pytest.fixture
def store():
    store = SharedStore(64 * MiB)
    try:  # numpy gets only memory faulted in already: the store's first chunk, here all
        assert wait_until(lambda: store.arena.reserved == 64 * MiB, timeout=10)
        yield store
    finally:
        store.close()


def in_compute_thread(store, work):
    """``work()`` run in a thread that allocates with the store's handler, as a worker's
    compute threads do; its result, or its exception raised here."""
    handler = numpy_allocator.arena_handler(store.arena)
    outcome = {}

    def run():
        numpy_allocator.use(handler)
        try:
            outcome["value"] = work()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_big_array_is_made_in_the_arena_and_shared_without_a_copy(store):
    def work():
        array = np.random.default_rng(0).random(MiB)  # 8 MiB
        small = np.ones(1000)
        return array, small, store.put_value(array)

    array, small, (view, ref_meta) = in_compute_thread(store, work)
    assert store.arena.holds_raw(array.ctypes.data)
    assert not store.arena.holds_raw(small.ctypes.data)  # left to libc
    assert np.shares_memory(view, array)  # stored where numpy made it
    assert store.info()["used"] == 8 * MiB + RAW_HEADER  # one allocation, no copy of it
    assert ref_meta["offset"] + ref_meta["size"] == array.ctypes.data - store.arena.address \
        + array.nbytes  # the metadata lies just in front of the data
    seen = store_module.get(StoreRef(ref_meta))  # a reader's view, through its session
    np.testing.assert_array_equal(seen, array)

    # the memory lives while a reader pins it, and goes back when nothing holds it
    del array, view
    gc.collect()
    assert store.info()["used"] == 8 * MiB + RAW_HEADER
    del seen
    gc.collect()
    assert wait_until(lambda: store.info()["used"] == 0, timeout=5)
    # numpy's main thread keeps its own allocator
    assert numpy_allocator.handler_name(np.ones(MiB)) == "default_allocator"


def test_a_reader_in_another_process_sees_the_array_and_its_shape(store):
    def work():
        array = np.arange(3 * MiB, dtype="i8").reshape(1024, 3 * 1024)
        return array, store.put_value(array)

    array, (_, ref_meta) = in_compute_thread(store, work)
    assert store.arena.holds_raw(array.ctypes.data)
    reader = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import pickle, sys
        from d3arrow import store
        value = store.get(pickle.loads(sys.stdin.buffer.read()))
        print(value.shape, value.dtype, int(value.sum()), value.flags.writeable)
        """)], input=pickle.dumps(StoreRef(ref_meta)), capture_output=True,
        timeout=60)
    assert reader.returncode == 0, reader.stderr.decode()
    assert reader.stdout.decode().split() == [
        "(1024,", "3072)", "int64", str(int(array.sum())), "False"]


def test_two_values_over_one_array_with_other_metadata_are_not_confused(store):
    def work():
        array = np.arange(MiB, dtype="f8")
        first = store.put_value(array)
        again = store.put_value(array)  # the same array, the same metadata: the same block
        other = store.put_value(array.reshape(1024, 1024))  # a header of its own: a copy
        return array, first, again, other

    array, (v1, m1), (v2, m2), (v3, m3) = in_compute_thread(store, work)
    assert m1["id"] == m2["id"] and m3["id"] != m1["id"]
    assert np.shares_memory(v1, array) and not np.shares_memory(v3, array)
    assert store_module.get(StoreRef(m1)).shape == (MiB,)
    assert store_module.get(StoreRef(m3)).shape == (1024, 1024)


def test_resize_zeros_and_a_full_arena_keep_numpys_meaning(store):
    def work():
        grown = np.arange(MiB // 4, dtype="f8")  # 2 MiB: in the arena
        grown.resize(MiB // 2, refcheck=False)  # numpy's realloc
        shrunk = np.arange(MiB // 2, dtype="f8")
        shrunk.resize(MiB // 4, refcheck=False)
        dirty = np.full(MiB, 7.0)
        dirty_address = dirty.ctypes.data
        del dirty  # its space is reused next, with the 7s in it
        zeros = np.zeros(MiB)
        huge = np.full(10 * MiB, 3.0)  # 80 MiB: more than the arena has, left to libc
        return grown, shrunk, zeros, dirty_address, huge

    grown, shrunk, zeros, dirty_address, huge = in_compute_thread(store, work)
    np.testing.assert_array_equal(grown[:MiB // 4], np.arange(MiB // 4))
    assert not grown[MiB // 4:].any()
    np.testing.assert_array_equal(shrunk, np.arange(MiB // 4))
    assert zeros.ctypes.data == dirty_address and not zeros.any()
    assert not store.arena.holds_raw(huge.ctypes.data) and (huge == 3.0).all()
    assert store.put_value(huge) is None  # the store is full for it: kept private


def test_a_big_array_beyond_the_memory_faulted_in_stays_private():
    """Fresh shared pages cost 20 times what fresh private ones do: a big temporary array
    is not worth faulting the store's memory in for."""
    store = SharedStore(2**30)
    try:
        assert wait_until(lambda: store.arena.reserved >= 64 * MiB, timeout=10)
        reserved = store.arena.reserved
        big, small = in_compute_thread(store, lambda: (np.ones(512 * MiB // 8),
                                                       np.ones(4 * MiB // 8)))
        assert not store.arena.holds_raw(big.ctypes.data) and (big == 1).all()
        assert store.arena.holds_raw(small.ctypes.data)
        assert store.arena.reserved < reserved + 512 * MiB
    finally:
        store.close()


def test_a_free_while_this_thread_holds_the_arenas_lock_waits_instead_of_deadlocking(store):
    arena = store.arena
    address = arena.allocate_raw(4 * MiB)
    with arena._lock:  # as in a garbage collection inside the allocator
        arena.free_raw(address)
        assert arena.holds_raw(address)
    assert arena.used > 0
    assert arena.allocate_raw(MiB) == address  # the next allocation gives it back first
    assert arena.used == MiB + RAW_HEADER and arena.raw_size(address) == MiB


@gen_cluster(n_workers=2)
async def test_a_workers_result_is_stored_where_numpy_made_it_and_peers_view_it(
        center, workers, pool):
    a, b = workers
    for worker in workers:  # numpy gets only store memory faulted in already
        await asyncio.wait_for(_reserved(worker.store.arena, 64 * MiB), 10)
    reply = await pool.rpc(a.address).compute(
        function=serialize(np.full), **calls(task("x", MiB, 2.0)))
    assert reply["nbytes"] == [MiB * 8] and "failed" not in reply
    assert a.store.arena.holds_raw(a.values["x"].ctypes.data)
    reply = await pool.rpc(b.address).compute(  # x is a view of a's memory on b
        function=serialize(operator.mul), **calls(task("y", KeyRef("x"), KeyRef("x"),
                                                       needed=["x"])))
    assert reply["nbytes"] == [MiB * 8] and "failed" not in reply
    np.testing.assert_array_equal(b.values["y"], np.full(MiB, 4.0))
    assert b.store.arena.holds_raw(b.values["y"].ctypes.data)


async def _reserved(arena, nbytes):
    while arena.reserved < nbytes:
        await asyncio.sleep(0.01)


def test_a_clients_view_of_a_result_outlives_its_deletion_and_new_arrays():
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        made = pool.apply(np.full, [4 * MiB, 1.0])
        view = made.get()
        pool.delete([made])
        later = [pool.apply(np.full, [4 * MiB, float(i)]) for i in range(2, 6)]  # would reuse it
        assert [r.get()[0] for r in later] == [2.0, 3.0, 4.0, 5.0]
        assert (view == 1.0).all()
        roots = pool.map(np.sqrt, later)
        assert [float(r.get()[-1]) for r in roots] == pytest.approx([2 ** 0.5, 3 ** 0.5, 2.0,
                                                                   5 ** 0.5])
