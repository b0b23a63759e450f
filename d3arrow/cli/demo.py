"""``d3arrow demo``: the seed's Pool session on a local cluster, then a 256 MB peer transfer."""

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
        for address in cluster.worker_addresses:
            print(f"Start worker at {address}")
        with Pool(cluster.center_address) as pool:
            _seed_session(pool)
            _transfer(pool, cluster.worker_addresses, args.megabytes, args.repeat)
    print("Stopped the cluster")
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
    if len(workers) < 2:
        print("(one worker: no peer-to-peer transfer to show)")
        return
    source, target = workers[:2]
    n = megabytes * 10**6 // 8
    print(f"\nMoving a {megabytes} MB float64 array from worker {source} to worker {target}")
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(repeat):
        array = rng.random(n)
        start = time.perf_counter()
        (x,) = pool.scatter([array], workers=[source])
        scatter_s = time.perf_counter() - start
        start = time.perf_counter()
        moved = pool.apply(np.sum, [x], workers=[target])
        seconds.append(time.perf_counter() - start)
        assert moved.get() == array.sum()
        print(f"  scatter client -> {source}: {array.nbytes / scatter_s / 1e9:5.2f} GB/s;  "
              f"{source} -> {target} (fetch + sum): {array.nbytes / seconds[-1] / 1e9:5.2f} GB/s")
        pool.delete([x, moved])
    median = statistics.median(seconds)
    print(f"Peer-to-peer: median {median * 1e3:.0f} ms for {n * 8 / 1e6:.0f} MB = "
          f"{n * 8 / median / 1e9:.2f} GB/s over {repeat} transfers")
