"""Co-located workers exchange values through shared memory; TCP when told or when needed."""

import asyncio
import gc
import os
import signal
import time

import numpy as np
import pytest

from conftest import freeze, gen_cluster, wait_until
from d3arrow import LocalCluster, Pool
from d3arrow.serialize import serialize
from d3arrow.store import _sessions


def mapping_of(address):
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return " ".join(rest[4:])
    return ""


@gen_cluster(n_workers=2)
async def test_fetch_from_a_colocated_peer_is_a_view_of_its_memory(center, workers, pool):
    a, b = workers
    array = np.random.default_rng(0).random(1_000_000)
    await pool.rpc(a.address).update_data(data={"x": serialize(array)})
    assert a.values.ref_meta("x")["kind"] == "shm"  # received over TCP straight into a's store
    used_before = a.store.info()["used"]
    await pool.rpc(b.address).fetch(keys=["x"])
    view = b.values["x"]
    session = _sessions._sessions[a.store.socket_name]
    assert session.address <= view.ctypes.data < session.address + len(session.mmap)
    assert not view.flags.writeable
    np.testing.assert_array_equal(view, array)
    assert a.store.info()["used"] == used_before and b.store.info()["used"] == 0
    assert a.store.info()["pins"] == 1

    # the owner deletes the key and fills its store again: the reader's data stays intact
    await pool.rpc(a.address).delete_data(keys=["x"])
    gc.collect()
    await pool.rpc(a.address).update_data(data={f"y{i}": serialize(np.zeros(1_000_000))
                                                for i in range(3)})
    np.testing.assert_array_equal(b.values["x"], array)

    # the reader drops it: the pin goes and the owner's memory is free for reuse
    await pool.rpc(b.address).delete_data(keys=["x"])
    del view
    gc.collect()
    for _ in range(200):
        if a.store.info()["pins"] == 0:
            break
        await asyncio.sleep(0.01)
    assert a.store.info()["pins"] == 0


@gen_cluster(n_workers=2)
async def test_results_are_copied_into_the_store_once(center, workers, pool):
    a, _ = workers
    await pool.rpc(a.address).compute(
        function=serialize(lambda: np.ones(2**20)),
        keys=["r"], args=serialize([()]))
    assert a.values.ref_meta("r")["kind"] == "shm"
    assert "/memfd:d3arrow-store" in mapping_of(a.values["r"].ctypes.data)
    used = a.store.info()["used"]
    assert 2**20 * 8 <= used < 2 * 2**20 * 8
    replies = await asyncio.gather(*(  # readers on this host get references, no copies
        pool.rpc(a.address).get_data(keys=["r"], host=a.store.host) for _ in range(2)))
    assert [r["data"]["r"].meta["kind"] for r in replies] == ["shm", "shm"]
    assert a.store.info()["used"] == used


@pytest.fixture(scope="module")
def shm_cluster():
    with LocalCluster(n_workers=2, ncores=1) as cluster:
        yield cluster


def test_client_on_the_same_host_reads_workers_memory_in_place(shm_cluster):
    a, b = shm_cluster.worker_addresses
    with Pool(shm_cluster.center_address) as pool:
        x = pool.apply(lambda: np.arange(2_000_000, dtype="f8"), workers=[a])
        pool.client.sync(pool.client._rpc(b).fetch, keys=[x.key])
        got = pool.client.gather([x])[0]
        np.testing.assert_array_equal(got, np.arange(2_000_000, dtype="f8"))
        assert mapping_of(got.ctypes.data).startswith("/memfd:d3arrow-store")
        info = pool.store_info()
        assert info[a]["used"] >= 16_000_000 and info[b]["used"] == 0  # one copy, not two


def test_a_result_comes_back_with_its_place_in_a_co_located_store(shm_cluster):
    """No request to read it: the worker pinned it for us while replying."""
    a, _ = shm_cluster.worker_addresses
    pid = shm_cluster.worker_processes[0].pid
    with Pool(shm_cluster.center_address) as pool:
        opener = pool.apply(np.ones, [100_000], workers=[a])
        opener.get()  # our session with a's store: later results come pinned
        pins = pool.store_info()[a]["pins"]
        made = pool.apply(lambda n: np.arange(n, dtype="f8"), [1_000_000], workers=[a])
        assert pool.store_info()[a]["pins"] == pins + 1  # before we asked for it
        freeze(pid)  # a frozen worker answers no request
        try:
            value = made.get()
        finally:
            os.kill(pid, signal.SIGCONT)
        expected = np.arange(1_000_000, dtype="f8")
        np.testing.assert_array_equal(value, expected)
        assert mapping_of(value.ctypes.data).startswith("/memfd:d3arrow-store")
        again = made.get()  # a view of its own, pinned for itself
        assert again is not value and again.ctypes.data == value.ctypes.data
        assert pool.store_info()[a]["pins"] == pins + 2
        del value
        gc.collect()
        np.testing.assert_array_equal(again, expected)  # one view's end frees no other's
        del again
        pool.delete([made])
        gc.collect()
        assert wait_until(lambda: pool.store_info()[a]["pins"] == pins)


def test_a_get_waiting_on_a_frozen_worker_holds_up_no_other_call():
    """The first view of a frozen worker's memory waits on its session; the client's loop
    goes on with every other worker meanwhile."""
    import threading

    import d3arrow.store

    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        made = pool.apply(lambda n: np.arange(n, dtype="f8"), [1_000_000], workers=[a])
        frozen = cluster.worker_processes[0].pid
        freeze(frozen)
        got, done, other = [], threading.Event(), []
        reader = threading.Thread(target=lambda: (got.append(made.get()), done.set()))
        elsewhere = threading.Thread(target=lambda: other.append(
            pool.gather(pool.map(abs, [-1, -2], workers=[b]))))
        session_timeout = d3arrow.store.SESSION_TIMEOUT
        d3arrow.store.SESSION_TIMEOUT = 60  # the reader's wait outlasts the checks below
        try:
            reader.start()
            time.sleep(0.5)  # it is waiting on a's session now
            elsewhere.start()
            elsewhere.join(timeout=20)
            assert other == [[1, 2]]  # b's replies were handled meanwhile
            assert not done.is_set()  # while the get still waits on a
        finally:
            os.kill(frozen, signal.SIGCONT)
            d3arrow.store.SESSION_TIMEOUT = session_timeout
        reader.join(timeout=60)
        elsewhere.join(timeout=60)
        np.testing.assert_array_equal(got[0], np.arange(1_000_000, dtype="f8"))


def test_a_reference_nobody_read_is_unpinned_when_its_value_goes(shm_cluster):
    a, _ = shm_cluster.worker_addresses
    with Pool(shm_cluster.center_address) as pool:
        opener = pool.apply(np.ones, [100_000], workers=[a])
        opener.get()
        gc.collect()
        pins, used = (pool.store_info()[a][k] for k in ("pins", "used"))
        unread = pool.map(np.zeros, [1_000_000] * 3, workers=[a])
        deleted = unread.pop()
        assert pool.store_info()[a]["pins"] == pins + 3
        pool.delete([deleted])  # deleted by name
        del unread  # forgotten: garbage collected
        gc.collect()
        assert wait_until(lambda: pool.store_info()[a]["pins"] == pins)
        assert wait_until(lambda: pool.store_info()[a]["used"] == used)


def test_map_over_many_small_arrays_with_the_store(shm_cluster):
    with Pool(shm_cluster.center_address) as pool:
        inputs = pool.scatter([np.full(10, i) for i in range(500)])
        sums = pool.gather(pool.map(np.sum, inputs))
        assert sums == [10 * i for i in range(500)]


def test_a_full_store_spills_rather_than_keep_values_in_private_memory(tmp_path):
    with LocalCluster(n_workers=2, ncores=1, shm_size=4 * 2**20,
                      local_directory=tmp_path) as cluster, \
            Pool(cluster.center_address) as pool:
        arrays = pool.map(lambda i: np.full(2**17, i, dtype="f8"), range(12))  # 1 MiB each
        totals = pool.gather(pool.map(lambda a: float(a.sum()), arrays))
        assert totals == [float(i * 2**17) for i in range(12)]
        assert [float(a[0]) for a in pool.gather(arrays)] == [float(i) for i in range(12)]
        assert sum(info["fallbacks"] for info in pool.store_info().values()) > 0
        assert sum(info["spilled_count"] for info in pool.memory_info().values()) > 0


def test_no_shm_goes_over_tcp():
    with LocalCluster(n_workers=2, ncores=1, shm=False) as cluster, \
            Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        assert [info["shared"] for info in pool.store_info().values()] == [False, False]
        x = pool.apply(lambda: np.ones(1_000_000), workers=[a])
        assert pool.apply(lambda v: float(v.sum()), [x], workers=[b]).get() == 1e6
        got = x.get()
        assert "memfd" not in mapping_of(got.ctypes.data)


def test_replica_survives_its_memorys_owner_being_killed():
    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(lambda: np.arange(1_000_000, dtype="f8"), workers=[a])
        pool.client.sync(pool.client._rpc(b).fetch, keys=[x.key])
        owner = cluster.worker_processes[cluster.worker_addresses.index(a)]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # b's replica is a view of a's memory, still mapped in b; the client cannot open a
        # session with the dead owner any more, so b sends the bytes over TCP instead
        got = pool.client.sync(pool.client._get_data, b, [x.key])[x.key]
        np.testing.assert_array_equal(got, np.arange(1_000_000, dtype="f8"))


def test_kill_9_of_every_process_leaves_dev_shm_as_it_was():
    before = sorted(os.listdir("/dev/shm"))
    cluster = LocalCluster(n_workers=2, ncores=1)
    try:
        with Pool(cluster.center_address) as pool:
            a, b = cluster.worker_addresses
            x = pool.apply(lambda: np.ones(4_000_000), workers=[a])
            pool.client.sync(pool.client._rpc(b).fetch, keys=[x.key])
            for process in cluster.processes:
                process.send_signal(signal.SIGKILL)
            for process in cluster.processes:
                process.wait()
    finally:
        cluster.close()
    time.sleep(0.1)
    assert sorted(os.listdir("/dev/shm")) == before


@gen_cluster(n_workers=2)
async def test_owner_pins_while_answering_a_reader_with_a_session(center, workers, pool):
    from d3arrow.store import load, session_token

    a, b = workers
    await pool.rpc(a.address).update_data(data={k: serialize(np.full(100_000, i))
                                                for i, k in enumerate(["x", "y"])})
    await pool.rpc(b.address).fetch(keys=["x"])  # opens b's session with a's store
    token = session_token(a.address)
    assert token is not None
    reply = await pool.rpc(a.address).get_data(keys=["y"], host=a.store.host, session=token)
    meta = reply["data"]["y"].meta
    assert meta["kind"] == "shm" and meta["token"] == token and meta["pin"]
    pins_before = a.store.info()["pins"]
    view = load(reply["data"]["y"], peer=a.address)  # no pin round trip: already pinned
    assert a.store.info()["pins"] == pins_before and (view == 1).all()
    del view
    gc.collect()
    assert await asyncio.to_thread(
        lambda: wait_until(lambda: a.store.info()["pins"] == pins_before - 1, timeout=5))


def test_a_dead_owners_memory_is_unmapped_once_no_view_remains():
    def spans():
        with open("/proc/self/maps") as f:
            return {line.split()[0] for line in f if "/memfd:d3arrow-store" in line}

    def span_of(address):
        return next(span for span in spans()
                    if int(span.split("-")[0], 16) <= address < int(span.split("-")[1], 16))

    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(lambda: np.ones(1_000_000), workers=[a])
        y = pool.apply(lambda: np.zeros(1_000_000), workers=[b])
        y.get()  # this process now maps b's region too
        view = x.get()
        a_span = span_of(view.ctypes.data)  # a's region, mapped by this reader
        owner = cluster.worker_processes[cluster.worker_addresses.index(a)]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert view.sum() == 1_000_000  # still readable: the mapping keeps the memory
        del view
        gc.collect()
        y.get()  # any later view sweeps sessions whose owner is gone
        gc.collect()
        assert a_span not in spans()
