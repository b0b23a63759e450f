"""Waiting on many RemoteData at once, as ``concurrent.futures.wait`` / ``as_completed`` do.

A RemoteData is done once its task has finished (``Pool.submit``); values that exist
already (scattered, or results of ``map``) are done from the start.
"""

import collections
import concurrent.futures
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .references import RemoteData

FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION
ALL_COMPLETED = concurrent.futures.ALL_COMPLETED


class DoneAndNotDone(NamedTuple):
    done: set
    not_done: set


def wait(fs: Iterable[RemoteData], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Wait until ``return_when`` holds for the RemoteData ``fs``, at most ``timeout`` s.

    Returns ``(done, not_done)``, two sets of RemoteData, as ``concurrent.futures.wait``.
    """
    fs = set(fs)
    done, _ = concurrent.futures.wait({f._state for f in fs}, timeout, return_when)
    finished = {f for f in fs if f._state in done}
    return DoneAndNotDone(finished, fs - finished)


def as_completed(fs: Iterable[RemoteData], timeout: float | None = None
                 ) -> Iterator[RemoteData]:
    """The RemoteData ``fs`` as their tasks finish (those done already first).

    Raises TimeoutError if some are not done ``timeout`` seconds after the call.
    """
    by_state = collections.defaultdict(list)
    for f in fs:
        by_state[f._state].append(f)
    try:
        for state in concurrent.futures.as_completed(by_state, timeout):
            yield from by_state[state]
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"not every task finished within {timeout} s") from None
