"""Scheduling a Pool's calls: where each goes, how many travel together, who steals.

Pure functions and small state objects, no I/O: the Pool applies them to its queues
(``{address: deque of call indices}``) and tests exercise them on plain data.
"""

import collections
from collections.abc import Callable, Mapping, Sequence

from .errors import KilledWorkerError

MAX_BATCH = 1024
BATCH_SECONDS = 0.02  # aim for this much work per request once task durations are known
PAUSED_RETRY_SECONDS = 0.1  # a worker over its memory limit is asked again this much later


def choose_worker(held: Mapping[str, int], candidates: Sequence[str],
                  load: Callable[[str], float]) -> str:
    """The candidate holding the most input bytes (``held``), the least loaded among equals;
    with no input held by a candidate, the least loaded one."""
    held = {a: n for a, n in held.items() if a in candidates}
    if held:
        most = max(held.values())
        return min((a for a in held if held[a] == most), key=load)
    return min(candidates, key=load)


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
