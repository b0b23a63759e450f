"""d3arrow demo: the seed's Pool session on a local cluster, then a 256 MB peer transfer."""

import argparse
import statistics
import time

import numpy as np

from ..cluster import LocalCluster
from ..pool import Pool


def main(argv=None):
    parser = argparse.ArgumentParser(prog="d3arrow demo", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--megabytes", type=int, default=256,
                        help="size of the array moved between workers (default 256)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfers to time; the median is printed (default 3)")
    args = parser.parse_args(argv)

    print(f"Starting a local cluster: a center and {args.workers} workers on 127.0.0.1")
    with LocalCluster(n_workers=args.workers) as cluster:
        print(f"Started center at {cluster.center_address}")
        print(f"Status page at {cluster.dashboard_address}?token=...  (d3arrow status "
              f"{cluster.center_address} prints it as a table)")
        for address in cluster.worker_addresses:
            print(f"Start worker at {address}")
        with Pool(cluster.center_address) as pool:
            _seed_session(pool)
            if args.workers < 2:
                print("(one worker: no peer-to-peer transfer to show)")
                return 0
            print(f"\nMoving a {args.megabytes} MB array from one worker to another "
                  "(a task on the second worker whose input lives on the first)")
            shared = _transfer(pool, cluster.worker_addresses, args.megabytes, args.repeat)
    with LocalCluster(n_workers=2, shm=False) as cluster, Pool(cluster.center_address) as pool:
        tcp = _transfer(pool, cluster.worker_addresses, args.megabytes, args.repeat)
    nbytes = args.megabytes * 10**6
    print(f"Peer-to-peer, same host, shared memory: median {shared * 1e3:.1f} ms "
          f"({nbytes / shared / 1e9:.1f} GB/s equivalent: a view, no copy)")
    print(f"Peer-to-peer, over TCP (--no-shm):      median {tcp * 1e3:.1f} ms "
          f"({nbytes / tcp / 1e9:.2f} GB/s)  -> shared memory {tcp / shared:.0f}x faster")
    print("Stopped the clusters")
    return 0


def _step(code, value=None, show=True):
    print(f">>> {code}")
    if show:
        print(repr(value))


def _seed_session(pool):
    _step(f"pool = Pool({pool.center!r})", show=False)
    pool.sync_center()
    _step("pool.sync_center()", show=False)
    _step("pool.available_cores", pool.available_cores)
    A = pool.map(lambda x: x**2, range(10))
    _step("A = pool.map(lambda x: x**2, range(10))", show=False)
    B = pool.map(lambda x: -x, A)
    _step("B = pool.map(lambda x: -x, A)", show=False)
    total = pool.apply(sum, [B])
    _step("total = pool.apply(sum, [B])", show=False)
    _step("total.get()", total.get())
    _step("A[:3]", A[:3])
    _step("pool.gather(A)", pool.gather(A))


def _transfer(pool, workers, megabytes, repeat):
    """Median seconds of a task on the second worker whose input lives on the first."""
    source, target = workers[:2]
    n = megabytes * 10**6 // 8
    seconds = []
    for i in range(repeat):
        x = pool.apply(lambda n, s: np.random.default_rng(s).random(n), [n, i],
                       workers=[source])
        start = time.perf_counter()
        moved = pool.apply(len, [x], workers=[target])  # fetches x first
        seconds.append(time.perf_counter() - start)
        assert moved.get() == n
        pool.delete([x, moved])
    return statistics.median(seconds)
