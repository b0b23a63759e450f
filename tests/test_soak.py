"""Soak: several clients at once, mixed work, a worker killed and a new one joining.

Every value a client gets back is checked against the same computation done locally. Lasts
``D3ARROW_SOAK_SECONDS`` (default 40) and prints its report.
"""

import collections
import os
import random
import signal
import sys
import threading
import time
import traceback

import cloudpickle
import numpy as np
import psutil
import pytest

from d3arrow import LocalCluster, LostDataError, Pool

SOAK_SECONDS = float(os.environ.get("D3ARROW_SOAK_SECONDS", "40"))
CLIENTS = 3
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def make(seed, n):
    return np.random.default_rng(seed).random(n)


def double_plus_one(v):
    return v * 2 + 1


def total(*vs):
    return float(sum(v.sum() for v in vs))


class Soaker:
    """One client's random mix of operations; counts what happened."""

    def __init__(self, address, seed, stop):
        self.pool = Pool(address)
        self.rng = random.Random(seed)
        self.stop = stop
        self.held = []  # (RemoteData, expected value, made by scatter)
        self.counts = collections.Counter()
        self.wrong = []
        self.errors = []

    def run(self):
        try:
            last_sync = time.monotonic()
            while not self.stop.is_set():
                if time.monotonic() - last_sync > 1.0:  # pick up workers that joined
                    self.pool.sync_center()
                    last_sync = time.monotonic()
                self.step()
        except Exception:  # anything not expected is a failure of the soak
            self.errors.append(traceback.format_exc())
        finally:
            self.held.clear()
            self.pool.close()

    def step(self):
        op = self.rng.choices(["make", "scatter", "map", "apply", "gather", "delete"],
                              [3, 1, 3, 2, 3, 2])[0]
        if len(self.held) > 30:
            op = "delete"
        try:
            getattr(self, op)()
            self.counts[op] += 1
        except LostDataError as e:  # only a scattered value (or what needs it) may be lost
            lost = set(e.keys)
            if not all(scattered or (remote.key not in lost)
                       for remote, _, scattered in self.held if remote.key in lost):
                raise
            self.counts["scattered value lost with its worker"] += 1
            self.held = [h for h in self.held if h[0].key not in lost]

    def _some(self, k):
        return self.rng.sample(self.held, min(k, len(self.held)))

    def make(self):
        seeds = [self.rng.randrange(10**6) for _ in range(self.rng.randint(1, 6))]
        n = self.rng.choice([100, 10_000, 300_000])
        results = self.pool.map(lambda seed: make(seed, n), seeds)
        for seed, remote in zip(seeds, results):
            self.held.append((remote, make(seed, n), False))

    def scatter(self):
        value = make(self.rng.randrange(10**6), self.rng.choice([50, 50_000]))
        (remote,) = self.pool.scatter([value])
        self._check(remote.get(), value)
        self.held.append((remote, value, True))

    def map(self):
        inputs = self._some(4)
        if inputs:
            results = self.pool.map(double_plus_one, [r for r, _, _ in inputs])
            for remote, (_, expected, scattered) in zip(results, inputs):
                self.held.append((remote, double_plus_one(expected), scattered))

    def apply(self):
        inputs = self._some(3)
        if inputs:
            result = self.pool.apply(total, [r for r, _, _ in inputs])
            self._check(result.get(), total(*[e for _, e, _ in inputs]))

    def gather(self):
        chosen = self._some(5)
        if chosen:
            values = self.pool.gather([r for r, _, _ in chosen])
            for value, (_, expected, _) in zip(values, chosen):
                self._check(value, expected)

    def delete(self):
        chosen = self._some(self.rng.randint(1, 6))
        self.pool.delete([r for r, _, _ in chosen])
        gone = {id(c) for c in chosen}
        self.held = [h for h in self.held if id(h) not in gone]

    def _check(self, value, expected):
        self.counts["values checked"] += 1
        if not np.allclose(value, expected):
            self.wrong.append((value, expected))


def _shm_entries():
    return set(os.listdir("/dev/shm"))


@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak_clients_survive_a_worker_dying_and_another_joining():
    shm_before = _shm_entries()
    stop = threading.Event()
    with LocalCluster(n_workers=3, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster:
        soakers = [Soaker(cluster.center_address, seed, stop) for seed in range(CLIENTS)]
        threads = [threading.Thread(target=s.run) for s in soakers]
        for t in threads:
            t.start()
        try:
            time.sleep(SOAK_SECONDS / 3)
            victim = cluster.worker_processes[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            time.sleep(SOAK_SECONDS / 3)
            joined = cluster.start_worker()
            time.sleep(SOAK_SECONDS / 3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        alive = [p for p in cluster.worker_processes if p.poll() is None]
        rss = {p.pid: psutil.Process(p.pid).memory_info().rss for p in alive}
        with Pool(cluster.center_address) as pool:
            left = {w: len(keys) for w, keys in pool.client.has_what().items()}
    counts = sum((s.counts for s in soakers), collections.Counter())
    wrong = sum(len(s.wrong) for s in soakers)
    errors = [e for s in soakers for e in s.errors]
    operations = sum(v for k, v in counts.items() if k != "values checked")
    print(f"\nsoak {SOAK_SECONDS:.0f} s, {CLIENTS} clients: {operations} operations "
          f"{dict(counts)}; wrong results {wrong}; lost results {len(errors)} {errors[:3]}; "
          f"keys left on workers after the clients closed {left}; worker RSS MiB "
          f"{[round(r / 2**20) for r in rss.values()]}; /dev/shm entries added "
          f"{sorted(_shm_entries() - shm_before)}")
    assert wrong == 0
    assert errors == []  # nothing lost that could be made again, nothing unexpected
    assert operations > 100 and counts["gather"] > 10
    assert joined in left and sum(left.values()) == 0  # every client freed its values
    assert not any(t.is_alive() for t in threads)
    assert _shm_entries() == shm_before
