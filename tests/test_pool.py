"""The Pool and the client against a LocalCluster of real worker processes."""

import gc
import re
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from conftest import freeze, wait_until
from d3arrow import LocalCluster, MissingDataError, Pool, RemoteData
from d3arrow.addressing import address_tuple


def holders(pool, remote):
    """{key: [address]} as the center sees it."""
    return pool.client.who_has([r.key for r in remote])


def test_seed_example(pool, cluster):
    pool.sync_center()
    assert pool.available_cores == {address_tuple(a): 2 for a in cluster.worker_addresses}
    A = pool.map(lambda x: x**2, range(10))
    B = pool.map(lambda x: -x, A)
    total = pool.apply(sum, [B])
    assert isinstance(total, RemoteData)
    assert total.get() == -285
    assert pool.gather(A) == [x**2 for x in range(10)]
    assert re.fullmatch(rf"RemoteData<center={cluster.center_address}, key=[0-9a-f]{{16}}-\d+>",
                        repr(A[0]))
    assert A[0].center == cluster.center_address


@pytest.mark.parametrize("array", [
    np.arange(24, dtype="f8").reshape(2, 3, 4), np.array(7, dtype="i2"), np.zeros((0, 5)),
    np.arange(100)[::7], np.arange(10, dtype=">i4"), np.array([1 + 1j]),
    np.array(["x", "yz"]), np.ones(3, dtype=bool)], ids=lambda a: f"{a.dtype}{a.shape}")
def test_scatter_gather_arrays(pool, array):
    (remote,) = pool.scatter([array])
    got = remote.get()
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_scatter_gather_100_megabytes(pool):
    array = np.random.default_rng(3).random(100 * 2**20 // 8)
    (remote,) = pool.scatter([array])
    np.testing.assert_array_equal(pool.gather([remote])[0], array)


def test_scatter_gather_arrow_and_python_objects(pool):
    table = pa.table({"a": np.arange(5), "b": list("abcde")})
    values = [table, {"nested": [1, (2, 3)]}, "text", None]
    got = pool.gather(pool.scatter(values))
    assert got[0].equals(table) and got[1:] == values[1:]


def test_map_runs_where_each_input_lives(pool, cluster):
    a, b = cluster.worker_addresses
    on_a = pool.scatter(range(4), workers=[a])
    on_b = pool.scatter(range(4), workers=[address_tuple(b)])
    results = pool.map(lambda x: x + 1, on_a + on_b)
    where = holders(pool, results)
    assert [where[r.key] for r in results] == [[a]] * 4 + [[b]] * 4
    assert pool.gather(results) == [1, 2, 3, 4] * 2


def test_remote_values_beside_values_that_are_pickled_in_one_call(pool):
    arrays = pool.map(np.arange, [3, 3])
    sums = pool.map(np.add, arrays, [np.ones(3), np.full(3, 2.0)])  # the args are pickled
    assert [s.tolist() for s in pool.gather(sums)] == [[1, 2, 3], [2, 3, 4]]
    both = pool.map(lambda a, b, c: a + b + c, arrays, sums, [10, 20])  # two inputs, flat
    assert [b.tolist() for b in pool.gather(both)] == [[11, 13, 15], [22, 24, 26]]


def test_a_map_over_held_and_plain_values_alike_fetches_the_held_ones(pool, cluster):
    a, b = cluster.worker_addresses
    held = pool.scatter([np.arange(n) for n in range(20)], workers=[a])
    # batches on b (after the first calls, many to a batch): calls over a held value need
    # it from a, the others need nothing
    mixed = [x for pair in zip(held, range(20)) for x in pair]
    results = pool.map(lambda v: int(np.sum(v)), mixed, workers=[b])
    assert pool.gather(results) == [x for n in range(20) for x in (n * (n - 1) // 2, n)]
    assert {a for r in results for a in holders(pool, [r])[r.key]} == {b}


def test_a_map_over_values_held_by_a_worker_it_may_not_use_fetches_them():
    # placed on b for want of an allowed holder: the calls come with hints, and b fetches
    # from a and tells the center of its copies without waiting for it, here frozen (b
    # has told it of nothing before: its link for updates was opened when it registered)
    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        held = pool.map(lambda n: np.full(3, n), range(50), workers=[a])
        center = cluster.center_process
        freeze(center.pid)
        try:
            results = pool.map(lambda v: int(v.sum()), held, workers=[b], timeout=30)
            values = pool.gather(results, timeout=30)
        finally:
            center.send_signal(signal.SIGCONT)
        assert values == [3 * n for n in range(50)]
        assert {a for r in results for a in holders(pool, [r])[r.key]} == {b}


def test_apply_runs_where_most_input_bytes_live(pool, cluster):
    a, b = cluster.worker_addresses
    (big,) = pool.scatter([np.ones(1_000_000)], workers=[b])
    (small,) = pool.scatter([np.ones(10)], workers=[a])
    total = pool.apply(lambda xs: sum(x.sum() for x in xs), [[small, big]])
    assert holders(pool, [total]) == {total.key: [b]}
    assert total.get() == 1_000_010
    # the small input was pulled peer to peer; b reports its replica to the center soon after
    wait_until(lambda: len(holders(pool, [small])[small.key]) == 2, timeout=5)
    assert sorted(holders(pool, [small])[small.key]) == sorted([a, b])


def test_apply_with_kwargs_and_pinned_worker(pool, cluster):
    a, b = cluster.worker_addresses
    (x,) = pool.scatter([np.arange(5)], workers=[a])
    result = pool.apply(lambda v, scale=1, extra=(): (v * scale).tolist() + list(extra),
                        [x], {"scale": 3, "extra": [x]}, workers=[b])
    assert holders(pool, [result]) == {result.key: [b]}
    assert result.get()[:5] == [0, 3, 6, 9, 12]


def test_keyword_arguments_name_values_held_elsewhere_beside_one_remote_argument(pool, cluster):
    a, b = cluster.worker_addresses
    (x,) = pool.scatter([np.arange(3)], workers=[a])
    (y,) = pool.scatter([np.full(3, 10)], workers=[b])
    result = pool.apply(lambda v, plus: (v + plus).tolist(), [x], {"plus": y}, workers=[a])
    assert result.get() == [10, 11, 12]


def test_idle_worker_takes_over_tasks_of_a_busy_one(pool, cluster):
    a, b = cluster.worker_addresses
    inputs = pool.scatter(range(8), workers=[a])
    results = pool.map(lambda x: time.sleep(0.3) or x, inputs)
    where = holders(pool, results)
    ran_on = {where[r.key][0] for r in results}
    assert ran_on == {a, b}
    assert pool.gather(results) == list(range(8))


def test_user_exception_reaches_the_caller_with_its_traceback(pool):
    def check(x):
        if x == 3:
            raise ValueError(f"bad input {x}")
        return x

    with pytest.raises(ValueError, match="bad input 3") as info:
        pool.map(check, range(5))
    assert "in check" in info.value.__cause__.text
    with pytest.raises(ValueError, match="bad input 3"):
        pool.apply(check, [3])


def test_missing_key_names_the_key(pool):
    with pytest.raises(MissingDataError, match="no-such-key") as info:
        pool.client.gather(["no-such-key"])
    assert isinstance(info.value, KeyError) and info.value.keys == ["no-such-key"]


def test_deleted_input_fails_the_computation_with_its_key(pool):
    (x,) = pool.scatter([1])
    pool.delete([x])
    with pytest.raises(MissingDataError, match=x.key):
        pool.apply(lambda v: v, [x])
    with pytest.raises(MissingDataError, match=x.key):
        x.get()


def test_unpicklable_function_is_a_clear_error(pool):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot send function .*lock"):
        pool.map(lambda x: lock, range(2))
    with pytest.raises(TypeError, match="not callable"):
        pool.apply(42)


def test_a_function_sent_by_value_carries_the_state_of_each_call(pool):
    """Named functions are serialized once; closures see their variables as they are now."""
    state = {"scale": 2}
    scaled = lambda x: x * state["scale"]  # noqa: E731
    assert pool.apply(scaled, [5]).get() == 10
    state["scale"] = 3
    assert pool.apply(scaled, [5]).get() == 15
    assert [pool.apply(abs, [-i]).get() for i in range(3)] == [0, 1, 2]


def test_apply_async_returns_at_once(pool):
    pending = pool.apply_async(lambda: time.sleep(0.5) or "done")
    assert not pending.ready()
    remote = pending.get(timeout=30)
    assert pending.successful() and remote.get() == "done"


def test_apply_async_exception_is_raised_by_get(pool):
    pending = pool.apply_async(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pending.get(timeout=30)


def test_dropped_remote_data_is_freed_on_the_workers(pool):
    remote = pool.map(lambda x: np.zeros(1000) + x, range(6))
    keys = [r.key for r in remote]
    assert all(pool.client.who_has(keys).values())
    del remote
    gc.collect()
    assert wait_until(lambda: not any(pool.client.who_has(keys).values()), interval=0.05)


@pytest.mark.parametrize("pause", [0.0, 0.005, 0.01, 0.012, 0.015, 0.02, 0.03])
def test_values_dropped_just_before_close_are_freed_too(cluster, pause):
    # close may come while the freeing of just-dropped values is under way
    with Pool(cluster.center_address) as other:
        for _ in range(5):
            with Pool(cluster.center_address) as closing:
                mine = closing.map(lambda x: np.zeros(100) + x, range(10))
                keys = [r.key for r in mine]
                del mine
                gc.collect()
                time.sleep(pause)
            assert not any(other.client.who_has(keys).values())


def test_delete_finds_values_whose_holder_the_client_forgot(pool):
    # a free cut short by close forgot where its values were before deleting them, and
    # the center had not heard of them yet (workers tell it in batches): the client's
    # close then left them on the workers until the center's next heartbeat freed them
    mine = pool.map(lambda x: np.zeros(100) + x, range(4))
    keys = {r.key for r in mine}
    for key in keys:
        pool.client.placement.forget(key)
    pool.delete(mine)
    client = pool.client
    held = {w: client.sync(client._rpc(w).keys)["keys"] for w in client.ncores}
    assert not keys & set().union(*held.values()), held


def test_another_client_finds_a_result_by_its_key_at_once(cluster, pool):
    # workers tell the center of results in batches: a key handed to another client as
    # soon as it was made is not known there yet, and was reported held by no worker
    with Pool(cluster.center_address) as other:
        for i in range(5):
            made = pool.apply(lambda i: np.arange(3) * i, [i])
            np.testing.assert_array_equal(other.gather(made.key), np.arange(3) * i)
        with pytest.raises(MissingDataError, match="no worker holds"):
            other.gather("f" * 16 + "-1")  # a key nobody made


def test_a_map_of_a_pool_closed_meanwhile_says_so(cluster, caplog):
    # closing cuts the map's connections: that is no worker's failure to retry around
    pool = Pool(cluster.center_address)
    outcome = []

    def run():
        try:
            pool.map(lambda x: (time.sleep(0.3), x)[1], range(40))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:  # until calls are in hand on the workers
        assert wait_until(lambda: sum(pool._running.values()) > 0, interval=0.01)
    finally:
        pool.close()
        thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    assert "closed" in str(outcome[0])
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


def test_values_in_use_are_not_freed(pool):
    kept = pool.scatter([10, 20])
    derived = pool.map(lambda x: x + 1, kept)
    del derived
    gc.collect()
    time.sleep(0.2)
    assert pool.gather(kept) == [10, 20]


def test_unknown_worker_is_refused(pool):
    with pytest.raises(ValueError, match="not workers of center"):
        pool.map(abs, [1], workers=["127.0.0.1:1"])


def test_pool_without_address_owns_a_local_cluster():
    with Pool(n_workers=1, ncores=1) as pool:
        assert len(pool.available_cores) == 1
        assert pool.apply(lambda: "hi").get() == "hi"
        processes = pool.client.cluster.processes
    assert all(p.poll() is not None for p in processes)


def test_small_results_come_back_with_their_computation(pool):
    small = pool.map(lambda x: x * 2, range(5))
    big = pool.apply(lambda: np.zeros(10_000))
    assert all(r.key in pool.client._inline for r in small)  # no gather round trip needed
    held = pool.client._inline[big.key]  # a big one: its place in the worker's store only
    assert held.meta["kind"] == "shm" and held.payloads == []
    assert pool.gather(small) == [0, 2, 4, 6, 8]
    pool.delete(small[:1])
    with pytest.raises(MissingDataError):
        small[0].get()


def test_map_finishes_on_the_survivors_when_a_worker_dies():
    import signal
    import threading

    from d3arrow import LocalCluster

    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        victim = cluster.worker_processes[0]
        killer = threading.Timer(0.5, victim.send_signal, [signal.SIGKILL])
        killer.start()
        try:
            results = pool.map(lambda x: time.sleep(0.05) or x * 10, range(40))
        finally:
            killer.join()
        assert victim.wait(timeout=10) == -signal.SIGKILL  # it died while the map ran
        survivor = cluster.worker_addresses[1]
        assert pool.gather(results) == [x * 10 for x in range(40)]  # small: came back inline
        on_survivor = sum(pool.client.where(r.key) == {survivor} for r in results)
        assert on_survivor > 20  # it ran its own half and took over the dead worker's rest


def test_results_holding_large_arrays_stay_on_the_workers(pool):
    (result,) = pool.map(lambda i: {"big": np.ones(1_000_000)}, [0])
    assert result.key not in pool.client._inline  # shallow size is small; the value is not
    assert result.get()["big"].sum() == 1_000_000


def test_an_interrupted_map_leaves_no_results_behind():
    from d3arrow import LocalCluster

    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        pending = pool.client.submit(pool._map, lambda x: time.sleep(0.3) or np.ones(10) * x,
                                     list(range(8)))
        time.sleep(0.15)  # the first calls are running on both workers
        pending.cancel()  # what Ctrl-C in a blocking map does to its coroutine
        held = lambda: sum(len(keys) for keys in pool.client.has_what().values())  # noqa: E731
        assert wait_until(lambda: held() == 0, timeout=5)
        time.sleep(0.5)  # the calls that were running have finished by now
        assert held() == 0
