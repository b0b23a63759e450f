"""Functions on the wire: pickled again only when what they are pickled with changed; quick
calls run on the worker's event loop (no thread hops), anything else does not."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import pytest

from d3arrow import LocalCluster, Pool
from d3arrow.functions import QUICK_AFTER, RETRUST_AFTER, SLOW_FOR_GOOD, wire_form

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def thread_of(seconds=0.0):
    """The thread the call ran in, after sleeping ``seconds``."""
    if seconds:
        time.sleep(seconds)
    return threading.current_thread().name


def thread_after(seconds=0.0):
    """As thread_of: another function, so the worker keeps what its calls took apart."""
    if seconds:
        time.sleep(seconds)
    return threading.current_thread().name


def thread_then(seconds=0.0):
    """As thread_of: one more function, whose first call is the slow one."""
    if seconds:
        time.sleep(seconds)
    return threading.current_thread().name


def sometimes_a_client(center):
    """Quick, unless given a center: then it stores and reads a value through a Pool of its
    own on that cluster (which needs the worker's loop, not its busy compute thread)."""
    if center is None:
        return threading.current_thread().name
    with Pool(center) as pool:
        (remote,) = pool.scatter([3])
        return pool.gather([remote])[0]


def with_asyncio(x):
    async def twice():
        await asyncio.sleep(0)
        return 2 * x
    return asyncio.run(twice()), threading.current_thread().name


FACTOR = 2
OFFSETS = [1]


def helper(x):
    return x


def scaled(x, extra=0):
    """Pickled by value (this module is registered so): with the globals it names."""
    return helper(x) * FACTOR + extra


def shifted(x):
    return x + OFFSETS[0]


def exits(code):
    if code:
        raise SystemExit(code)
    return threading.current_thread().name


SLOW = 0.2  # seconds: a slow call here (quick: under 50 ms, so a busy machine does not
# decide what runs where in these tests)


@pytest.fixture(scope="module")
def one_worker():
    os.environ["D3ARROW_QUICK_CALL_SECONDS"] = "0.05"  # the worker's, read as it starts
    try:
        with LocalCluster(n_workers=1, ncores=1) as cluster, \
                Pool(cluster.center_address) as pool:
            yield cluster, pool
    finally:
        del os.environ["D3ARROW_QUICK_CALL_SECONDS"]


def test_a_function_whose_calls_were_quick_runs_on_the_loop(one_worker):
    _, pool = one_worker
    threads = [pool.apply(thread_of).get() for _ in range(QUICK_AFTER + 3)]
    assert all(t.startswith("d3arrow-compute") for t in threads[:QUICK_AFTER])
    assert threads[QUICK_AFTER:] == ["MainThread"] * 3


def test_a_slow_call_sends_a_function_to_the_threads_until_it_is_quick_again(one_worker):
    _, pool = one_worker
    for _ in range(QUICK_AFTER + 1):
        pool.apply(thread_of, [0.0]).get()
    assert pool.apply(thread_of, [0.0]).get() == "MainThread"
    assert pool.apply(thread_of, [SLOW]).get() == "MainThread"  # not known to be slow yet
    # one hiccup does not keep it off the loop for good, nor does it come back at once
    assert [pool.apply(thread_of, [0.0]).get() for _ in range(RETRUST_AFTER + 1)] == [
        "d3arrow-compute_0"] * RETRUST_AFTER + ["MainThread"]
    assert pool.apply(thread_of, [SLOW]).get() == "MainThread"  # slow again: trusted less
    assert {pool.apply(thread_of, [0.0]).get() for _ in range(2 * RETRUST_AFTER)} == {
        "d3arrow-compute_0"}
    assert pool.apply(thread_of, [0.0]).get() == "MainThread"


def test_a_call_far_over_the_quick_limit_sends_a_function_to_the_threads_for_good(
        one_worker):
    _, pool = one_worker
    for _ in range(QUICK_AFTER + 1):
        pool.apply(thread_after, [0.0]).get()
    assert pool.apply(thread_after, [0.0]).get() == "MainThread"
    pool.apply(thread_after, [0.05 * SLOW_FOR_GOOD + 0.1]).get()  # no hiccup: really slow
    threads = {pool.apply(thread_after, [0.0]).get() for _ in range(2 * RETRUST_AFTER)}
    assert threads == {"d3arrow-compute_0"}  # never trusted with the loop again


def test_a_first_call_far_over_the_limit_in_a_thread_does_not_keep_it_there(one_worker):
    """A first call runs in a compute thread: slow there (one-time work, a busy machine),
    it held up nothing, and the function's quick calls come to the loop as any."""
    _, pool = one_worker
    assert pool.apply(thread_then, [0.05 * SLOW_FOR_GOOD + 0.1]).get().startswith(
        "d3arrow-compute")
    threads = [pool.apply(thread_then, [0.0]).get() for _ in range(QUICK_AFTER + 2)]
    assert threads[QUICK_AFTER:] == ["MainThread"] * 2


def test_a_client_inside_a_quick_function_is_run_again_in_a_thread(one_worker):
    cluster, pool = one_worker
    for _ in range(QUICK_AFTER + 1):
        pool.apply(sometimes_a_client, [None]).get()
    assert pool.apply(sometimes_a_client, [None]).get() == "MainThread"
    # on the loop, its Pool would wait for the loop it blocks: it runs in a thread instead
    result = pool.apply(sometimes_a_client, [cluster.center_address], timeout=60)
    assert result.get() == 3
    assert pool.apply(sometimes_a_client, [None]).get().startswith("d3arrow-compute")


def test_asyncio_run_inside_a_call_on_the_loop_works(one_worker):
    _, pool = one_worker
    values = [pool.apply(with_asyncio, [i]).get() for i in range(QUICK_AFTER + 3)]
    assert [v for v, _ in values] == [2 * i for i in range(QUICK_AFTER + 3)]
    assert values[-1][1] == "MainThread"
    assert pool.gather(pool.map(abs, [-1, -2])) == [1, 2]  # the loop still serves


def test_system_exit_in_a_call_on_the_loop_is_the_callers_error(one_worker):
    _, pool = one_worker
    for _ in range(QUICK_AFTER + 1):
        pool.apply(exits, [0]).get()
    assert pool.apply(exits, [0]).get() == "MainThread"
    with pytest.raises(SystemExit):
        pool.apply(exits, [3]).get()
    assert pool.map(exits, [0, 0]) is not None  # the worker is still there
    assert pool.gather(pool.map(exits, [0, 0])) == ["MainThread"] * 2


def test_a_script_function_is_pickled_again_only_when_what_it_uses_changed(one_worker):
    global FACTOR, helper
    _, pool = one_worker
    assert pool.apply(scaled, [10]).get() == 20
    FACTOR = 3  # a global it names, rebound
    assert pool.apply(scaled, [10]).get() == 30
    original = helper
    try:
        helper = lambda x: -x  # noqa: E731 (a function it calls, replaced)
        assert pool.apply(scaled, [10]).get() == -30
    finally:
        helper = original
    scaled.__defaults__ = (100,)
    try:
        assert pool.apply(scaled, [10]).get() == 130
    finally:
        scaled.__defaults__ = (0,)
        FACTOR = 2
    assert pool.apply(scaled, [10]).get() == 20
    assert pool.apply(shifted, [10]).get() == 11
    OFFSETS[0] = 5  # changed in place: a list is pickled at every call
    try:
        assert pool.apply(shifted, [10]).get() == 15
    finally:
        OFFSETS[0] = 1


def test_an_unchanged_script_function_is_pickled_once():
    def quick(x):
        return helper(x) * FACTOR

    assert wire_form(quick) is wire_form(quick)
    assert wire_form(scaled) is wire_form(scaled)
    assert wire_form(shifted) is not wire_form(shifted)  # names a list: pickled every time


def test_a_pool_used_while_its_module_is_imported_is_an_error_not_a_hang(tmp_path):
    """pickle would wait for the import lock the importing thread holds while it waits for
    the Pool: a clear error instead, and the cluster still stops."""
    (tmp_path / "uses_a_pool.py").write_text(textwrap.dedent("""
        from d3arrow import Pool

        def double(x):
            return 2 * x

        with Pool(n_workers=1, ncores=1) as pool:
            print(pool.gather(pool.map(double, [1, 2])))
        """))
    run = subprocess.run([sys.executable, "-c", "import uses_a_pool"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "RuntimeError: cannot send double to the workers while its module 'uses_a_pool'" \
        " is still being imported" in run.stderr
    # run as a script, the same file works
    run = subprocess.run([sys.executable, "uses_a_pool.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[2, 4]", run.stderr
