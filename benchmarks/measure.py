"""What the benchmarks measure, written once for pytest-benchmark, asv and the comparison.

Every figure is wall-clock time in this process; clusters are real processes on 127.0.0.1.
"""

import contextlib
import statistics
import time

import numpy as np

from d3arrow import LocalCluster, Pool

MiB = 2**20
GiB = 2**30


@contextlib.contextmanager
def cluster(*, shm=True, n_workers=2, ncores=1):
    """A LocalCluster and a Pool on it."""
    with LocalCluster(n_workers=n_workers, ncores=ncores, shm=shm) as local, \
            Pool(local.center_address, shm=shm) as pool:
        yield local, pool


def make_on(pool, worker, nbytes, seed=0):
    """A float64 array of ``nbytes`` computed on ``worker`` (so it lives in its store)."""
    return pool.apply(lambda n, s: np.random.default_rng(s).random(n // 8), [nbytes, seed],
                      workers=[worker])


def fetch(pool, target, remote, source):
    """Have ``target`` fetch ``remote`` from ``source``: one worker-to-worker transfer.

    Returns the seconds the target spent fetching (its own clock).
    """
    client = pool.client
    reply = client.sync(client._rpc(target).fetch, keys=[remote.key],
                        who_has={remote.key: [source]})
    return reply["seconds"]


def forget(pool, target, remote):
    client = pool.client
    client.sync(client._rpc(target).delete_data, keys=[remote.key])


def time_transfers(pool, source, target, nbytes, repeat):
    """Worker-to-worker transfers of an ``nbytes`` array, ``repeat`` times.

    Returns ``(end_to_end, in_worker)`` seconds: as the client asking for the transfer sees
    it, and as the receiving worker measured its fetch.
    """
    remote = make_on(pool, source, nbytes)
    end_to_end, in_worker = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        in_worker.append(fetch(pool, target, remote, source))
        end_to_end.append(time.perf_counter() - start)
        forget(pool, target, remote)
    pool.delete([remote])
    return end_to_end, in_worker


def median(values):
    return statistics.median(values)
