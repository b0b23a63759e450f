"""What a server did, counted where it happens: running totals a worker sends with its
heartbeat (no extra round trip), and the rates the center derives from two of them.

Totals only grow (Prometheus counters); gauges (memory, store use, event loop lag) are
sampled when the heartbeat leaves. Everything is counted on the event loop, never from a
compute thread, so no count is lost to a race.
"""

import asyncio
import collections
import time
from typing import Any

LAG_INTERVAL = 0.5  # how often the event loop's lag is sampled


class Counters:
    """Running totals by name (``tasks``, ``bytes_sent_tcp``, ...)."""

    def __init__(self) -> None:
        self.totals: collections.Counter = collections.Counter()

    def add(self, name: str, amount: float = 1) -> None:
        self.totals[name] += amount

    def add_each(self, **amounts: float) -> None:
        totals = self.totals
        for name, amount in amounts.items():
            totals[name] += amount

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


class LoopLag:
    """How late the event loop wakes a sleeper: a loop blocked by a slow callback answers
    nobody meanwhile. Keeps the worst lag since it was last read."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.worst = max(self.worst, loop.time() - start - LAG_INTERVAL)

    def read(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class Rates:
    """Per second rates of a worker's totals, from its last two heartbeats."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, dict]] = {}
        self.rates: dict[str, dict[str, float]] = {}

    def update(self, worker: str, totals: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        before = self._last.get(worker)
        self._last[worker] = (now, totals)
        if before is None or now <= before[0]:
            return
        seconds = now - before[0]
        self.rates[worker] = {
            name: max(0.0, (value - before[1].get(name, 0)) / seconds)
            for name, value in totals.items() if isinstance(value, (int, float))}

    def forget(self, worker: str) -> None:
        self._last.pop(worker, None)
        self.rates.pop(worker, None)


SUMMED = ("tasks", "tasks_failed", "compute_seconds", "calls_running", "memory_bytes",
          "spilled_bytes", "store_used_bytes", "store_capacity_bytes", "bytes_sent_tcp",
          "bytes_received_tcp", "bytes_sent_shm", "bytes_received_shm")
RATES = ("tasks", "bytes_sent_tcp", "bytes_received_tcp", "bytes_sent_shm",
         "bytes_received_shm")


def totals_of(workers):
    """The cluster's totals of what its workers sent (``counters``, ``gauges``, ``rates``
    per worker, as in a status reply)."""
    totals = {}
    for name in SUMMED:
        totals[name] = sum(w["counters"].get(name, 0) + w["gauges"].get(name, 0)
                           for w in workers)
    for name in RATES:
        totals[f"{name}_per_second"] = sum(w["rates"].get(name, 0.0) for w in workers)
    return totals
