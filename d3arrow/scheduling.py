"""Scheduling a Pool's calls: where each goes, how many travel together, who steals, whose
request goes first.

Pure functions and small state objects, no I/O: the Pool applies them to its queues
(``{address: deque of call indices}``) and tests exercise them on plain data.
"""

import asyncio
import collections
import heapq
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence

from .errors import KilledWorkerError

MAX_BATCH = 1024
BATCH_SECONDS = 0.02  # aim for this much work per request once task durations are known
PAUSED_RETRY_SECONDS = 0.1  # a worker over its memory limit is asked again this much later


def choose_worker(held: Mapping[str, int], candidates: Collection[str],
                  load: Callable[[str], float]) -> str:
    """The candidate holding the most input bytes (``held``), the least loaded among equals;
    with no input held by a candidate, the least loaded one. ``candidates``: a set or a
    dict where there are many (membership is asked per holder)."""
    held = {a: n for a, n in held.items() if a in candidates}
    if held:
        most = max(held.values())
        return min((a for a in held if held[a] == most), key=load)
    return min(candidates, key=load)


def split_in_runs(items: Sequence, workers: Sequence[str], ncores: Mapping[str, int],
                  calls: Mapping[str, int]) -> dict[str, list]:
    """``items`` cut into one contiguous run per worker, sized so that each ends with the
    same number of calls per core (``calls``: what each has queued or running already).

    For calls that no input ties anywhere: neighbours in a sequence are usually combined
    later (pairs of a reduction, a window), and a run keeps them on one worker, as dask
    co-assigns sibling root tasks, where dealing them out in turn would put every pair on
    two workers.
    """
    counts = _even_counts(len(items), workers, ncores, calls)
    runs, start = {}, 0
    for address in workers:
        if counts[address]:
            runs[address] = list(items[start:start + counts[address]])
            start += counts[address]
    return runs


def _even_counts(n, workers, ncores, calls):
    """How many of ``n`` calls each worker gets, dealt one at a time to the worker that then
    has the fewest per core (the first of equals), but counted in bulk: first every call
    that lands below the level where ``n`` calls even the load out (the dealing's first
    picks, whatever its order), then the few left one by one. A map's 10,000 calls cost
    microseconds, not a heap operation each."""
    cores = {a: ncores.get(a, 1) for a in workers}
    had = {a: calls.get(a, 0) for a in workers}
    per_core = lambda a, j: (had[a] + j) / cores[a]  # noqa: E731  (with its j-th new call)
    level, below = 0.0, []  # fill the least loaded up to a common level that takes all n
    calls_below, cores_below = n, 0
    for a in sorted(workers, key=lambda a: had[a] / cores[a]):
        if below and had[a] / cores[a] >= level:
            break
        below.append(a)
        calls_below += had[a]
        cores_below += cores[a]
        level = calls_below / cores_below
    level *= 1 - 1e-9  # strictly under it, however floats round: never more than n
    counts = dict.fromkeys(workers, 0)
    for a in below:
        j = max(0, int(level * cores[a]) - had[a] - 1)
        while j > 0 and per_core(a, j) >= level:
            j -= 1
        while per_core(a, j + 1) < level:
            j += 1
        counts[a] = j
    heap = [(per_core(a, counts[a] + 1), i, a) for i, a in enumerate(workers)]
    heapq.heapify(heap)
    for _ in range(n - sum(counts.values())):
        _, i, address = heap[0]
        counts[address] += 1
        heapq.heapreplace(heap, (per_core(address, counts[address] + 1), i, address))
    return counts


def take_batch(address: str, queues: dict[str, collections.deque], ncores: Mapping[str, int],
               most: int) -> list[int]:
    """Calls for one request: from our own queue's head, else stolen from a busy worker.

    At most ``most`` calls, and no more than a share of what is queued, so every core of the
    worker gets some. A worker is busy when its queue holds more calls than it has cores to
    start them; only then is moving a call (and its inputs) elsewhere sure to finish it
    sooner.
    """
    own = queues[address]
    if own:
        size = max(1, min(most, len(own) // (2 * ncores.get(address, 1))))
        return [own.popleft() for _ in range(size)]
    victim = max(queues, key=lambda a: len(queues[a]) - ncores.get(a, 1))
    other = queues[victim]
    surplus = len(other) - ncores.get(victim, 1)
    if surplus <= 0:
        return []
    size = max(1, min(most, surplus // 2))
    return [other.pop() for _ in range(size)]


class Pace:
    """How many calls to send per request: about BATCH_SECONDS of work, once measured.

    Until a batch has come back, calls go one at a time, so a few long calls spread over
    every core; tiny calls then travel by the hundred, so per-request costs vanish.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def record(self, calls: int, seconds: float) -> None:
        self.calls += calls
        self.seconds += seconds

    def per_call(self) -> float | None:
        """Seconds a call has taken on average, or None before any came back."""
        return self.seconds / self.calls if self.calls else None

    def batch_size(self) -> int:
        per_call = self.per_call()
        if per_call is None:
            return 1
        if per_call <= 0:
            return MAX_BATCH
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / per_call)))


class Deaths:
    """Calls in hand when their worker died, counted like dask's ``allowed-failures``.

    Every call of a request whose worker died gets a death; from then on it travels alone,
    so an innocent call that shared a batch with a killer clears itself. A call with more
    than ``allowed`` deaths is taken to kill workers and given up.
    """

    def __init__(self, allowed: int, name: str) -> None:
        self.allowed = allowed
        self.name = name
        self.workers = collections.defaultdict(list)  # call -> workers that died with it
        self.suspects = set()

    def record(self, indices: Sequence[int], address: str) -> dict[int, KilledWorkerError]:
        """Count a death for each call; ``{index: KilledWorkerError}`` for those given up."""
        given_up = {}
        for index in indices:
            self.workers[index].append(address)
            self.suspects.add(index)
            if len(self.workers[index]) > self.allowed:
                given_up[index] = KilledWorkerError.after(
                    f"a call of {self.name}", self.workers[index], self.allowed)
        return given_up


class Turns:
    """At most ``limit`` requests in flight to each worker, over every run of calls; those
    waiting for a turn get it by priority (lowest first, then first come).

    Every run (a ``map``, calls of a function that became ready together) sends its own
    requests. Without a common limit, tasks submitted one by one would all be sent at once
    and queue on their worker in arrival order: a task whose inputs just appeared would
    wait behind every task sent before it, and a reduction would make every intermediate
    result before combining any (holding them all, spilling them all).
    """

    def __init__(self) -> None:
        self.in_flight: collections.Counter = collections.Counter()
        self._waiting: dict[str, list] = collections.defaultdict(list)
        self._arrival = itertools.count()

    def turn(self, address: str, limit: int, priority: tuple) -> "_Turn":
        """``async with turns.turn(address, limit, priority):`` one request's turn."""
        return _Turn(self, address, limit, priority)

    async def _enter(self, address, limit, priority):
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting[address], (priority, next(self._arrival), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # handed over as we were cancelled
                self._leave(address)
            raise

    def _free(self, address, limit):
        """Take a turn at once if one is free and nobody waits for it."""
        if self.in_flight[address] < limit and not self._waiting.get(address):
            self.in_flight[address] += 1
            return True
        return False

    def _leave(self, address):
        """The turn passes to the first waiter still waiting, else back to the pool."""
        waiting = self._waiting[address]
        while waiting:
            granted = heapq.heappop(waiting)[2]
            if not granted.done():
                granted.set_result(None)
                return
        self.in_flight[address] -= 1


class _Turn:
    """One request's turn (a class, not a generator: it is taken for every request)."""

    __slots__ = ("turns", "address", "limit", "priority")

    def __init__(self, turns, address, limit, priority):
        self.turns, self.address, self.limit, self.priority = turns, address, limit, priority

    async def __aenter__(self):
        if not self.turns._free(self.address, self.limit):
            await self.turns._enter(self.address, self.limit, self.priority)

    async def __aexit__(self, *exc):
        self.turns._leave(self.address)
