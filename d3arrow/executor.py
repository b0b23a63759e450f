"""``d3arrow.Executor``: a ``concurrent.futures.Executor`` whose work runs on a cluster.

Its futures are plain ``concurrent.futures.Future`` objects that give *values*, so the
standard library's ``as_completed`` and ``wait``, ``loop.run_in_executor`` and any library
that takes an executor work unchanged. Each task is a :meth:`Pool.submit`: it runs where
its inputs live, and its result is fetched to this process once done, then freed.
"""

import asyncio
import concurrent.futures
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .pool import Pool
from .references import RemoteData


class Executor(concurrent.futures.Executor):
    """Run callables on a d3arrow cluster, as ``concurrent.futures`` executors do.

    Parameters
    ----------
    address : str, optional
        The center; without one, a private LocalCluster is started and stopped with the
        executor.
    **kwargs
        Passed to :class:`~d3arrow.Pool` (``timeout``, ``auth_token``, ``n_workers``, ...).

    Examples
    --------
    >>> with Executor() as executor:                                  # doctest: +SKIP
    ...     futures = [executor.submit(pow, 2, i) for i in range(10)]
    ...     [f.result() for f in concurrent.futures.as_completed(futures)]
    """

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        self.pool = Pool(address, **kwargs)
        self._futures: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; a future of its value."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            remote = self.pool.submit(fn, *args, **kwargs)
            future = self.pool.client.submit(_value, self.pool.client, remote)
            self._futures.add(future)
            return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        """Like the builtin ``map``, on the cluster; results in order, each waited for at
        most until ``timeout`` seconds after this call. ``chunksize`` calls travel (and run)
        together as one task: fewer round trips for many small calls."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        futures = [self.submit(_apply_chunk, fn, chunk)
                   for chunk in _chunks(zip(*iterables), chunksize)]

        def results():
            try:
                for future in futures:
                    try:
                        yield from future.result(
                            None if end is None else max(0.0, end - time.monotonic()))
                    except concurrent.futures.TimeoutError:
                        raise TimeoutError(f"map not done within {timeout} s") from None
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; cancel what has not run (``cancel_futures``), wait for the rest
        (``wait``), then close the pool (and a cluster it started)."""
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            concurrent.futures.wait(futures)
        self.pool.close()


async def _value(client, remote: RemoteData) -> Any:
    """The value of a submitted task, fetched once it is done; cancelling cancels the task."""
    try:
        (value,) = await client.values_of([remote])
        return value
    except asyncio.CancelledError:
        remote.cancel()
        raise


def _apply_chunk(fn: Callable, chunk: list[tuple]) -> list:
    return [fn(*args) for args in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk
