"""Pool.submit: tasks that depend on pending tasks, the future protocol, wait, as_completed."""

import concurrent.futures
import operator
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest

import d3arrow
from d3arrow import LocalCluster, Pool

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def slow_inc(x, seconds=0.2):
    time.sleep(seconds)
    return x + 1


def fails(message):
    raise ValueError(message)


def test_a_chain_of_pending_tasks_runs_as_inputs_appear(pool):
    x = pool.submit(slow_inc, 1)
    assert not x.done()  # returned at once, the task still sleeping
    y = pool.submit(operator.add, x, 10)
    z = pool.submit(lambda values, scale: sum(values) * scale, [x, y], scale=2)  # nested
    assert z.result(timeout=30) == (2 + 12) * 2
    assert x.done() and y.done() and z.done()
    assert y.get() == 12 and y.exception() is None
    assert pool.gather([x, y]) == [2, 12]


def test_a_task_starts_when_its_inputs_exist_not_when_their_siblings_finish(pool):
    # calls of one function sent by name that become ready together run as one group:
    # builtins.eval is one, and reads its input from the globals it is given
    x = pool.submit(slow_inc, 1)
    quick = pool.submit(eval, "x + 1", {"x": x})
    slow = pool.submit(eval, "__import__('time').sleep(5) or x + 1", {"x": x})
    after_quick = pool.submit(slow_inc, quick, 0.0)
    assert after_quick.result(timeout=4) == 4
    assert not slow.done()  # before: after_quick waited for slow, its sibling
    slow.cancel()


def test_a_task_whose_input_failed_fails_with_that_error(pool):
    bad = pool.submit(fails, "no such file")
    after = pool.submit(slow_inc, bad)
    with pytest.raises(ValueError, match="no such file"):
        after.result(timeout=30)
    assert isinstance(after.exception(), ValueError)
    assert "fails" in str(bad.exception().__cause__)  # the remote traceback
    with pytest.raises(ValueError):
        pool.map(slow_inc, [bad])  # map waits for pending inputs too, and fails alike


def test_cancelling_a_pending_task_cancels_what_depends_on_it(pool):
    first = pool.submit(slow_inc, 1, seconds=3)
    second = pool.submit(slow_inc, {"nested": [first]}.__getitem__("nested")[0])
    third = pool.submit(slow_inc, second)
    assert first.cancel()
    for task in (first, second, third):
        with pytest.raises(concurrent.futures.CancelledError):
            task.result(timeout=30)
        assert task.cancelled()
    assert not first.cancel() or first.cancelled()
    assert pool.submit(slow_inc, 5, seconds=0).result(timeout=30) == 6  # the pool goes on


def test_done_callbacks_receive_the_remote_data(pool):
    called = threading.Event()
    seen = []
    task = pool.submit(slow_inc, 41)
    task.add_done_callback(lambda f: (seen.append(f), called.set()))
    assert called.wait(30)
    assert seen == [task] and task.result() == 42
    late = []
    task.add_done_callback(late.append)  # done already: called at once
    assert late == [task]


def test_wait_and_as_completed_follow_the_tasks():
    with Pool(n_workers=2, ncores=2) as pool:  # idle cores: no other test's sleepers
        slow = pool.submit(slow_inc, 0, seconds=3)
        fast = pool.submit(slow_inc, 0, seconds=0.1)
        ready = pool.scatter([7])[0]
        done, not_done = d3arrow.wait([slow, fast, ready], timeout=30,
                                      return_when=d3arrow.FIRST_COMPLETED)
        assert ready in done and slow in not_done
        assert list(d3arrow.as_completed([slow, fast], timeout=30)) == [fast, slow]
        done, not_done = d3arrow.wait([slow, fast, ready], timeout=30)
        assert done == {slow, fast, ready} and not not_done
        with pytest.raises(TimeoutError):
            list(d3arrow.as_completed([pool.submit(slow_inc, 0, seconds=3)], timeout=0.5))


def test_map_takes_several_iterables_and_pending_inputs(pool):
    pending = [pool.submit(slow_inc, i, seconds=0.05) for i in range(4)]
    sums = pool.map(operator.add, pending, [10, 20, 30, 40, 50])  # the shortest wins
    assert pool.gather(sums) == [11, 22, 33, 44]


def test_an_unpicklable_function_is_refused_at_submit(pool):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot send function"):
        pool.submit(lambda: lock)


def test_a_submitted_result_lost_with_its_worker_is_made_again():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.submit(np.arange, 100_000, workers=[a])
        x.result(timeout=30)
        cluster.worker_processes[0].send_signal(signal.SIGKILL)
        cluster.worker_processes[0].wait(timeout=10)
        np.testing.assert_array_equal(x.result(timeout=60), np.arange(100_000))
        assert pool.client.where(x.key) == {b}


def odd_fails(_, x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return np.full(2000, x)  # even ones: results too big to come back with the reply


def test_tasks_that_run_together_each_get_their_own_outcome(pool):
    """Tasks ready together run in requests of several calls (after one-call probes); a
    reply gives each call its own result or error, however they alternate."""
    gate = pool.submit(slow_inc, 0, seconds=0.3)
    tasks = [pool.submit(odd_fails, gate, x) for x in range(12)]
    d3arrow.wait(tasks, timeout=60)
    for x, task in enumerate(tasks):
        if x % 2:
            assert isinstance(task.exception(), ValueError) and str(task.exception()) == f"odd {x}"
        else:
            assert task.exception() is None
            np.testing.assert_array_equal(task.result(), np.full(2000, x))
