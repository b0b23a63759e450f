"""Processes die, hang, restart and stop: results survive or fail clearly, nothing hangs.

Every test runs its own cluster of real processes, since it breaks it.
"""

import gc
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pytest

from conftest import freeze, wait_until
from d3arrow import LocalCluster, LostDataError, Pool

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def _big(seed):
    """An array large enough to stay on its worker (not inlined into replies)."""
    return np.random.default_rng(seed).random(50_000)


@pytest.fixture
def cluster():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster:
        yield cluster


def _kill(cluster, index):
    process = cluster.worker_processes[index]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    return cluster.worker_addresses[index]


def test_a_result_lost_with_its_worker_is_made_again_from_its_lineage(cluster):
    a, b = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        x = pool.apply(_big, [1], workers=[a])
        y = pool.apply(lambda v: v * 2, [x], workers=[a])
        z = pool.apply(lambda v: v + 1, [y], workers=[b])
        expected_y = _big(1) * 2
        _kill(cluster, 0)
        np.testing.assert_array_equal(y.get(timeout=60), expected_y)  # x and y made again
        assert pool.client.where(y.key) == {b}
        np.testing.assert_array_equal(x.get(), _big(1))
        np.testing.assert_array_equal(z.get(), expected_y + 1)  # never lost: untouched


def test_a_dropped_intermediate_is_made_again_only_for_the_while_it_is_needed(cluster):
    a, b = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        x = pool.apply(_big, [2], workers=[a])
        y = pool.apply(lambda v: v.sum(), [x], workers=[a])
        w = pool.apply(lambda v: v[:2000] * 3, [x], workers=[a])
        x_key = x.key
        del x
        gc.collect()
        assert wait_until(lambda: not pool.client.who_has([x_key])[x_key])  # freed
        _kill(cluster, 0)
        np.testing.assert_array_equal(w.get(timeout=60), _big(2)[:2000] * 3)
        assert y.get() == pytest.approx(_big(2).sum())
        # x was made again for w, then freed: nothing is left that nobody owns
        assert wait_until(lambda: not pool.client.who_has([x_key])[x_key])
        assert set(pool.client.has_what([b])[b]) == {y.key, w.key}  # y was lost too


def test_a_map_over_lost_results_remakes_them_and_finishes(cluster):
    with Pool(cluster.center_address) as pool:
        first = pool.map(_big, range(8))
        assert {a for r in first for a in pool.client.where(r.key)} == set(
            cluster.worker_addresses)  # spread over both
        _kill(cluster, 0)
        sums = pool.map(lambda v: float(v.sum()), first)
        assert pool.gather(sums) == pytest.approx([_big(i).sum() for i in range(8)])


def test_a_scattered_value_lost_with_its_worker_is_a_lost_data_error_naming_it(cluster):
    a, _ = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        (scattered,) = pool.scatter([_big(3)], workers=[a])
        derived = pool.apply(lambda v: v * 2, [scattered], workers=[a])
        _kill(cluster, 0)
        start = time.monotonic()
        with pytest.raises(LostDataError, match=scattered.key):
            scattered.get()
        with pytest.raises(LostDataError, match=scattered.key):
            pool.apply(len, [scattered])
        with pytest.raises(LostDataError, match=scattered.key):
            derived.get()  # its lineage starts from the lost scattered value
        assert time.monotonic() - start < 30  # failing fast, not after timeouts


def test_a_computation_on_a_hung_worker_moves_on_once_the_center_drops_it(cluster):
    a, b = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        pending = pool.apply_async(lambda: time.sleep(0.5) or _big(4), workers=[a])
        time.sleep(0.2)  # the call is on its way to a
        hung = cluster.worker_processes[0]
        freeze(hung.pid)
        try:
            with pytest.raises(ConnectionError):
                pending.get(timeout=60)  # pinned to a: a clear error, not a hang
            result = pool.apply(lambda: _big(5), timeout=60)  # placed on the live worker
            assert pool.client.where(result.key) == {b}
        finally:
            hung.send_signal(signal.SIGCONT)


def test_a_delete_waits_on_no_frozen_worker_that_failed_us(cluster):
    # the value's one holder froze and failed us, so the client knows no holder of it: the
    # delete makes sure the center heard of our results, asking no worker that failed us
    a, _ = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        on_a = pool.apply(lambda: _big(1), workers=[a])
        hung = cluster.worker_processes[0]
        freeze(hung.pid)
        try:
            pool.client.placement.failed(a)  # as when a request to it failed
            pool.delete([on_a], timeout=1.0)  # asking it would take 2 s
            assert pool.apply(abs, [-3]).get() == 3
        finally:
            hung.send_signal(signal.SIGCONT)


def test_a_call_with_a_timeout_gives_up_and_the_pool_goes_on(cluster):
    with Pool(cluster.center_address) as pool:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.apply(time.sleep, [3], timeout=0.5)
        assert time.monotonic() - start < 2.5
        # the abandoned call runs on to its end in its worker thread; its result is dropped
        assert pool.apply(abs, [-4]).get() == 4
        assert wait_until(lambda: sum(map(len, pool.client.has_what().values())) == 1)


def test_workers_come_back_to_a_restarted_center_with_their_keys():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2) as cluster, \
            Pool(cluster.center_address) as pool:
        results = pool.map(_big, range(6))
        before = pool.client.who_has([r.key for r in results])
        port = cluster.center_address.rsplit(":", 1)[1]
        cluster.center_process.send_signal(signal.SIGKILL)
        cluster.center_process.wait(timeout=10)
        time.sleep(1.0)  # the workers notice, and back off
        restarted = subprocess.Popen(
            [sys.executable, "-m", "d3arrow.cli.center", "--port", port,
             "--heartbeat-interval", "0.2"], stdout=subprocess.DEVNULL,
            env={**os.environ, "D3ARROW_AUTH_TOKEN": cluster.auth_token})
        try:
            def whole_again():
                try:
                    return pool.client.who_has([r.key for r in results]) == before
                except ConnectionError:
                    return False
            assert wait_until(whole_again, timeout=20)
            pool.sync_center()
            assert sorted(pool.available_cores) == sorted(
                tuple(a.rsplit(":", 1)[0:1]) + (int(a.rsplit(":", 1)[1]),)
                for a in cluster.worker_addresses)
            total = pool.apply(lambda *vs: float(sum(v.sum() for v in vs)), results)
            assert total.get() == pytest.approx(sum(_big(i).sum() for i in range(6)))
        finally:
            restarted.terminate()
            restarted.wait(timeout=10)


def test_sigterm_lets_the_call_in_hand_finish_and_unregisters_the_worker(cluster):
    a, b = cluster.worker_addresses
    with Pool(cluster.center_address) as pool:
        pending = pool.apply_async(lambda: time.sleep(1.0) or 42, workers=[a])
        time.sleep(0.3)
        worker = cluster.worker_processes[0]
        worker.send_signal(signal.SIGTERM)
        assert pending.get(timeout=30).get() == 42  # its reply still came
        assert worker.wait(timeout=15) == 0
        assert list(pool.client.sync_ncores()) == [b]  # unregistered, not timed out


def test_a_peer_dying_mid_transfer_leaves_nothing_behind_on_the_receiver():
    with LocalCluster(n_workers=2, ncores=1, shm=False) as cluster, \
            Pool(cluster.center_address, shm=False) as pool:
        a, b = cluster.worker_addresses
        big = pool.apply(lambda: np.ones(2**30 // 8), workers=[a])  # 1 GiB: ~0.3-1 s to send
        client = pool.client
        used = lambda: client.sync(client._rpc(b).identity)["store"]["used"]  # noqa: E731
        baseline = used()
        fetching = client.submit(lambda: client._rpc(b).fetch(keys=[big.key],
                                                               who_has={big.key: [a]}))
        wait_until(lambda: used() > baseline, timeout=10, interval=0.002)
        _kill(cluster, 0)
        reply = fetching.result(timeout=60)
        assert (reply["status"], reply["keys"]) == ("missing-data", [big.key])  # not hung
        assert wait_until(lambda: used() == baseline)
        assert pool.apply(abs, [-1], workers=[b]).get() == 1  # and it goes on serving
        assert os.path.exists(f"/proc/{cluster.worker_processes[1].pid}")


def test_a_fetch_cut_off_by_its_peer_dying_is_finished_from_another_holder():
    with LocalCluster(n_workers=3, ncores=1, shm=False) as cluster, \
            Pool(cluster.center_address, shm=False) as pool:
        a, b, c = cluster.worker_addresses
        client = pool.client
        big = pool.apply(lambda: np.arange(2**30 // 8, dtype=np.float64), workers=[a])
        client.sync(client._rpc(c).fetch, keys=[big.key], who_has={big.key: [a]})  # a replica
        used = lambda: client.sync(client._rpc(b).identity)["store"]["used"]  # noqa: E731
        baseline = used()
        fetching = client.submit(lambda: client._rpc(b).fetch(keys=[big.key],
                                                               who_has={big.key: [a]}))
        wait_until(lambda: used() > baseline, timeout=10, interval=0.002)
        _kill(cluster, 0)  # a dies while b reads from it; b asks the center, then reads c
        reply = fetching.result(timeout=60)
        assert reply["status"] == "OK", reply
        total = pool.apply(lambda v: float(v[::4096].sum()), [big], workers=[b])
        assert total.get() == float(np.arange(2**30 // 8, dtype=np.float64)[::4096].sum())
