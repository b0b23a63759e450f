"""Co-located worker-to-worker transfer: shared memory versus the ``--no-shm`` TCP path.

    python -m benchmarks.shm_vs_tcp [--repeat 5] [--sizes 1M,64M,1G]

Both paths run in this one invocation on the same machine; the table shows medians and
their ratio, and how much shared memory the two workers use with one copy of the value.
Then: the cost of putting a value into the store beside a memcpy of the same bytes, and a
Pool.map over 10,000 small arrays with the store on and off.
"""

import argparse
import gc
import time

import numpy as np

from d3arrow.store import SharedStore

from .measure import GiB, MiB, cluster, make_on, fetch, forget, median, transfer_seconds


def parse_sizes(text):
    units = {"K": 2**10, "M": MiB, "G": GiB}
    return [int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)
            for s in text.split(",")]


def shared_memory_use(pool, source, target, nbytes):
    """Bytes in use in both stores while the target holds a co-located copy."""
    remote = make_on(pool, source, nbytes, seed=1)
    fetch(pool, target, remote, source)
    info = pool.store_info()
    used = info[source]["used"] + info[target]["used"]
    forget(pool, target, remote)
    pool.delete([remote])
    return used


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1M,64M,1G"))
    args = parser.parse_args(argv)
    results = {}
    for shm in (True, False):
        with cluster(shm=shm) as (local, pool):
            source, target = local.worker_addresses
            for nbytes in args.sizes:
                end_to_end, in_worker = transfer_seconds(pool, source, target, nbytes,
                                                       args.repeat)
                used = shared_memory_use(pool, source, target, nbytes) if shm else None
                results[shm, nbytes] = (median(end_to_end), median(in_worker), used)
    print(f"{'size':>8} | {'shared memory':>22} | {'TCP (--no-shm)':>22} | {'ratio':>11} | "
          f"{'TCP GB/s':>8} | shm in use")
    print(f"{'':>8} | {'client':>10} {'worker':>11} | {'client':>10} {'worker':>11} | "
          f"{'client':>5} {'worker':>5} | {'':>8} | / size")
    for nbytes in args.sizes:
        shm_e, shm_w, used = results[True, nbytes]
        tcp_e, tcp_w, _ = results[False, nbytes]
        label = f"{nbytes // GiB} GiB" if nbytes >= GiB else f"{nbytes // MiB} MiB"
        print(f"{label:>8} | {shm_e * 1e3:7.2f} ms {shm_w * 1e3:8.2f} ms | "
              f"{tcp_e * 1e3:7.2f} ms {tcp_w * 1e3:8.2f} ms | {tcp_e / shm_e:4.0f}x "
              f"{tcp_w / shm_w:5.0f}x | {nbytes / tcp_e / 1e9:8.2f} | {used / nbytes:.2f}")
    print(f"Medians of {args.repeat} transfers. A transfer: the client asks the target worker "
          "to fetch the value from the source; 'client' is that request end to end, 'worker' "
          "the target's own time from request to value in hand.")
    put_versus_memcpy(max(args.sizes), args.repeat)
    small_maps(args.repeat)


def put_versus_memcpy(nbytes, repeat):
    """Seconds to put an array into a store: fresh space, reused space, and a plain memcpy."""
    array = np.random.default_rng(2).random(nbytes // 8)
    target = np.empty_like(array)
    np.copyto(target, array)  # fault the destination in, as the store does ahead of use
    copies = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(target, array)
        copies.append(time.perf_counter() - start)
    store = SharedStore(2 * nbytes + 2**20)
    try:
        start = time.perf_counter()
        ref = store.put(array)
        fresh = time.perf_counter() - start
        reused = []
        for _ in range(repeat):
            store.delete(ref)
            gc.collect()
            start = time.perf_counter()
            ref = store.put(array)
            reused.append(time.perf_counter() - start)
    finally:
        store.close()
    print(f"\nput {nbytes / GiB:.2f} GiB into the store: fresh space {fresh * 1e3:.0f} ms, "
          f"reused space {median(reused) * 1e3:.0f} ms ({nbytes / median(reused) / 1e9:.1f} GB/s); "
          f"memcpy into faulted memory {median(copies) * 1e3:.0f} ms "
          f"({nbytes / median(copies) / 1e9:.1f} GB/s): put / memcpy = "
          f"{median(reused) / median(copies):.2f}")


def small_maps(repeat, n=10_000):
    """Pool.map of ``n`` calls on small arrays, store on and off: calls per second."""
    rates = {}
    for shm in (True, False):
        with cluster(shm=shm) as (_, pool):
            inputs = pool.scatter([np.full(100, i, dtype="f8") for i in range(n)])
            seconds = []
            for _ in range(max(1, repeat // 2)):
                start = time.perf_counter()
                results = pool.map(np.sum, inputs)
                seconds.append(time.perf_counter() - start)
                del results
            rates[shm] = n / median(seconds)
    print(f"Pool.map over {n} arrays of 800 bytes: store on {rates[True]:.0f} calls/s, "
          f"off {rates[False]:.0f} calls/s (on / off = {rates[True] / rates[False]:.2f})")


if __name__ == "__main__":
    main()
