"""d3arrow.Executor through the standard library's own helpers."""

import asyncio
import concurrent.futures
import operator
import sys
import time

import cloudpickle
import pytest

from d3arrow import Executor

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def slow_square(x, seconds=0.05):
    time.sleep(seconds)
    return x * x


def fails(message):
    raise ValueError(message)


@pytest.fixture(scope="module")
def executor():
    with Executor(n_workers=2, ncores=1) as executor:
        yield executor


def test_futures_are_standard_and_give_values(executor):
    future = executor.submit(pow, 2, 10)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 1024
    failed = executor.submit(fails, "bad input")
    assert isinstance(failed.exception(timeout=30), ValueError)
    with pytest.raises(ValueError, match="bad input"):
        failed.result()


def test_the_standard_as_completed_and_wait_work_unchanged(executor):
    futures = {executor.submit(slow_square, i): i for i in range(8)}
    got = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures, timeout=30)}
    assert got == {i: i * i for i in range(8)}
    done, not_done = concurrent.futures.wait(list(futures), timeout=30)
    assert len(done) == 8 and not not_done


def test_map_with_chunks_and_a_timeout(executor):
    assert list(executor.map(operator.mul, range(10), range(10), chunksize=3)) == [
        i * i for i in range(10)]
    assert list(executor.map(slow_square, [1, 2, 3])) == [1, 4, 9]
    results = executor.map(slow_square, [1, 2], [3, 0], timeout=0.5)
    with pytest.raises(TimeoutError):
        list(results)


def test_asyncio_runs_blocking_calls_in_it(executor):
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, slow_square, i)
                                      for i in range(4)))
    assert asyncio.run(main()) == [0, 1, 4, 9]


def test_shutdown_cancels_what_has_not_run_and_refuses_more():
    executor = Executor(n_workers=1, ncores=1)
    running = executor.submit(slow_square, 3, seconds=0.5)
    waiting = [executor.submit(slow_square, i, seconds=2) for i in range(3)]
    time.sleep(0.2)
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() or f.done() for f in [running, *waiting])
    assert any(f.cancelled() for f in waiting)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(pow, 2, 2)
