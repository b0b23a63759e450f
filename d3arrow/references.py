"""RemoteData, and the counts of them that decide when a client's values are freed.

Counting happens on the client's event loop. A RemoteData may be dropped in any thread,
also inside a garbage collection that interrupts the loop thread at any allocation, so a
drop only appends the key to a deque (atomic) and asks the loop to count it: it never
blocks and takes no lock.
"""

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .core import log_failure
from .errors import RemoteExit
from .task import KeyRef

logger = logging.getLogger(__name__)

RELEASE_DELAY = 0.01  # let a burst of drops collect into one message per worker


def _finished() -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(None)
    return future


_DONE = _finished()  # the state of every value that exists already


class RemoteData(KeyRef):
    """A value held by the workers, named by ``key``; ``get()`` fetches it.

    A RemoteData is also a future (``Pool.submit`` returns it before its task ran):
    ``done()``, ``result()``, ``exception()``, ``cancel()``, ``add_done_callback()``, as
    ``concurrent.futures.Future``, except that ``result()`` fetches the value.

    Attributes
    ----------
    key : str
    center : str
        Address of the center that knows where the value lives.
    """

    __slots__ = ("_client", "_owned", "_recipe", "_state", "_depth", "__weakref__")
    __dask_future__ = True  # inside a dask graph it names a value the workers hold

    def __init__(self, key: str, client: Any, *, owned: bool = False,
                 recipe: Any = None, state: concurrent.futures.Future = _DONE) -> None:
        self.key = key
        self._client = client
        self._owned = owned
        self._recipe = recipe  # how it was made (Pool results): kept alive with it
        self._state = state  # done once the value exists (or its task failed)
        self._depth = 0  # how many submitted tasks lead up to it: deeper ones go first
        if owned:
            client.refs.add(key)

    # -- the future protocol ---------------------------------------------------------------

    def done(self) -> bool:
        """Whether its task has finished (the value exists, or it failed, or was cancelled)."""
        return self._state.done()

    def exists(self) -> bool:
        """Whether the value exists: made, or its task finished without error."""
        state = self._state
        return state is _DONE or (state.done() and not state.cancelled()
                                  and state.exception() is None)

    def cancelled(self) -> bool:
        return self._state.cancelled()

    def cancel(self) -> bool:
        """Cancel its task, and every task waiting for it, unless it has finished already."""
        return self._state.cancel()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for its task; the exception it raised, or None. CancelledError if cancelled."""
        try:
            exc = self._state.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.key} not done within {timeout} s") from None
        return exc.exc if isinstance(exc, RemoteExit) else exc

    def result(self, timeout: float | None = None) -> Any:
        """Wait for its task and fetch the value (as :meth:`get`), or raise its exception."""
        return self.get(timeout=timeout)

    def add_done_callback(self, fn: Any) -> None:
        """Call ``fn(self)`` once its task has finished (at once if it has)."""
        self._state.add_done_callback(lambda _: fn(self))

    def failure(self) -> BaseException | None:
        """Once done: what its task raised (a CancelledError if it was cancelled), or None."""
        if self._state.cancelled():
            return asyncio.CancelledError(f"{self.key} was cancelled")
        return self._state.exception()

    @property
    def recipe(self) -> Any:
        """How it was made (a :class:`~d3arrow.lineage.Recipe`), None if scattered."""
        return self._recipe

    @property
    def center(self) -> str:
        return self._client.center

    def get(self, *, timeout: float | None = None) -> Any:
        """Fetch the value from a worker that holds it.

        A Pool result whose every copy was lost with its workers is computed again from
        its lineage first.

        Raises
        ------
        LostDataError
            Every copy was lost and the value cannot be computed again (it was scattered,
            or an input it needs was).
        MissingDataError
            No live worker holds the key, or it was deleted.
        TimeoutError
            Not done within ``timeout`` seconds.
        """
        return self._client.gather([self], timeout=timeout)[0]

    def __repr__(self) -> str:
        state = "" if self.done() and not self.cancelled() and self._state.exception() is None \
            else " cancelled" if self.cancelled() else " error" if self.done() else " pending"
        return f"RemoteData<center={self.center}, key={self.key}{state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteData) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __reduce__(self):
        raise TypeError("a RemoteData cannot be pickled: it is bound to its client. In the "
                        "arguments of Pool.map / Pool.apply it is replaced by its value (also "
                        "inside lists, tuples, sets and dict values), but not as a dict key "
                        "or inside other objects: send its .key there")

    def __del__(self) -> None:
        if self._owned:
            try:
                self._client.refs.drop(self.key)
            except Exception:  # interpreter shutdown: the cluster goes away anyway
                pass


def not_made(inputs_per_call: Iterable[tuple]) -> list[int]:
    """The positions of the calls with an input not known to exist yet (a pending or
    failed task's): the inputs of a map over made values cost one look each, no call."""
    return sorted({i for i, inputs in enumerate(inputs_per_call) for ref in inputs
                   if ref._state is not _DONE})


async def wait_for(inputs: Iterable[RemoteData]) -> BaseException | None:
    """On the client's loop: until every input's task has finished; the first failure of
    one (what it raised, or a CancelledError), else None. Cancelling the waiter cancels
    the waiter only, never an input."""
    inputs = list(inputs)
    pending = [asyncio.wrap_future(r._state) for r in inputs if not r.done()]
    if pending:
        await asyncio.wait(pending)
        for waiter in pending:  # the failure is read from the input below, not from here
            if not waiter.cancelled():
                waiter.exception()
    for ref in inputs:
        failure = ref.failure()
        if failure is not None:
            return failure
    return None


class References:
    """How many RemoteData name each key of a client; frees keys nobody names.

    Parameters
    ----------
    call_soon : callable(fn)
        Runs ``fn`` on the client's loop, from any thread.
    free : async callable(keys)
        Frees keys on the workers.
    """

    def __init__(self, call_soon: Callable[[Callable[[], None]], None],
                 free: Callable[[list[str]], Awaitable[None]]) -> None:
        self._call_soon = call_soon
        self._free = free
        self._counts: dict[str, int] = {}  # (a Counter's del is a Python call per key)
        self._dropped: collections.deque = collections.deque()  # keys whose RemoteData went
        self._drops_scheduled = False
        # keys no RemoteData names, to free on the workers: in the order they went (a dict
        # as an ordered set), which is mostly the order they were made in, so each of the
        # dicts they are freed from is read in its own order, not at random
        self._released: dict[str, None] = {}
        self._release_task: asyncio.Task | None = None
        self.deleted: set[str] = set()  # deleted on purpose while RemoteData still name them
        self.kept: set[str] = set()  # published: not freed with their RemoteData, nor on close
        self.closed = False

    def add(self, key: str) -> None:
        """Count a new RemoteData (of a key made for it, or on the loop thread)."""
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1  # (Counter's += calls __missing__ in Python)

    def drop(self, key: str) -> None:
        """From any thread, also from inside a garbage collection: never blocks, no lock."""
        self._dropped.append(key)  # atomic
        if not self._drops_scheduled and not self.closed:
            self._drops_scheduled = True
            try:
                self._call_soon(self.apply_drops)
            except RuntimeError:  # the loop is closed: the cluster goes away anyway
                pass

    def apply_drops(self) -> None:
        """Count the drops handed to the loop; start freeing keys nobody names.

        While freeing is under way, later drops wake nobody: it counts them itself when
        it next frees (a wake-up of the loop thread per dropped RemoteData would cost a
        caller that makes and drops one per call more than the call)."""
        self._count_drops()
        if self._released and not self.closed:
            if self._release_task is None or self._release_task.done():
                self._release_task = asyncio.get_running_loop().create_task(self._release())
                self._release_task.add_done_callback(log_failure("freeing released values"))
            self._drops_scheduled = True  # _release counts what comes meanwhile

    def _count_drops(self) -> None:
        self._drops_scheduled = False  # before taking them: a later drop schedules again
        counts, released, dropped = self._counts, self._released, self._dropped
        while dropped:
            key = dropped.popleft()
            left = counts.pop(key, 1) - 1
            if left > 0:  # another RemoteData still names it
                counts[key] = left
            else:
                released[key] = None
        if self.deleted:
            self.deleted.difference_update([k for k in released if k not in counts])

    async def _release(self) -> None:
        while self._released:
            await asyncio.sleep(RELEASE_DELAY)
            self._count_drops()
            counts, kept = self._counts, self.kept
            keys = [k for k in self._released if k not in counts and k not in kept]
            self._released = {}
            try:
                await self._free(keys)
            except BaseException:  # cancelled by close, or failed: close frees them
                self._released.update(dict.fromkeys(k for k in keys if k not in self._counts))
                self._drops_scheduled = False  # the next drop wakes the loop again
                raise

    def __contains__(self, key: object) -> bool:
        """Whether a RemoteData of ours names ``key``."""
        return key in self._counts

    def mark_deleted(self, keys: Iterable[str]) -> None:
        self.deleted.update(self._counts.keys() & keys)

    async def close(self) -> set[str]:
        """Stop freeing in the background; the keys still to free (named or released)."""
        self.apply_drops()
        self.closed = True
        if self._release_task is not None:
            self._release_task.cancel()
            await asyncio.gather(self._release_task, return_exceptions=True)
        return (set(self._counts) | self._released.keys()) - self.kept
