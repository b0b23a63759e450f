"""dask graphs and task chains on d3arrow, beside dask's threaded scheduler in the same run.

    python -m benchmarks.graphs [--repeat 3]

Each run builds its graph afresh (new keys, so no scheduler answers from a previous run);
values do not depend on the process, so results are compared. d3arrow: a LocalCluster of
2 workers x 1 core; dask threaded: 2 threads. Medians of ``--repeat`` runs; every run is
printed, the first (cold) one included. docs/benchmarks.md quotes the output.
"""

import argparse
import operator
import statistics
import time

import dask
import dask.array as da
import numpy as np

from d3arrow import Pool


def p1():
    """(x + x.T).sum(axis=0), x 12000x12000 float64 random, 1500x1500 chunks (1.15 GB)."""
    x = da.random.default_rng(42).random((12000, 12000), chunks=1500)
    return (x + x.T).sum(axis=0)


def p2():
    """10,000 chunks of 20x20 ones (map_blocks), .sum()."""
    return da.ones((2000, 2000), chunks=20).map_blocks(lambda b: b * 2).sum()


def p3():
    """1,000 dask.delayed(inc, pure=False) tasks, each on the previous."""
    inc = dask.delayed(operator.add, pure=False)
    value = 0
    for _ in range(1000):
        value = inc(value, 1)
    return value


def _inc(x):
    return x + 1


def submit_chain(pool, n=1000):
    start = time.perf_counter()
    value = pool.submit(_inc, 0)
    for _ in range(n - 1):
        value = pool.submit(_inc, value)
    assert value.result() == n
    return (time.perf_counter() - start) / n


def _timed(build, scheduler):
    collection = build()  # fresh keys each run
    start = time.perf_counter()
    result = dask.compute(collection, scheduler=scheduler)[0]
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with Pool(n_workers=2, ncores=1) as pool:
        for name, build in (("P1", p1), ("P2", p2), ("P3", p3)):
            ours, theirs = [], []
            for _ in range(args.repeat):
                seconds, result = _timed(build, pool.get)
                ours.append(seconds)
                with dask.config.set(num_workers=2):
                    seconds, expected = _timed(build, "threads")
                theirs.append(seconds)
                np.testing.assert_allclose(result, expected)
            print(f"{name} ({build.__doc__.strip()})\n"
                  f"    d3arrow  median {statistics.median(ours):.2f} s  runs "
                  f"{' '.join(f'{s:.2f}' for s in ours)}\n"
                  f"    threaded median {statistics.median(theirs):.2f} s  runs "
                  f"{' '.join(f'{s:.2f}' for s in theirs)}  -> d3arrow / threaded "
                  f"{statistics.median(ours) / statistics.median(theirs):.2f}", flush=True)
        chain = [submit_chain(pool) for _ in range(args.repeat)]
        print(f"pool.submit chain of 1,000 dependent tiny tasks: median "
              f"{statistics.median(chain) * 1e3:.2f} ms per task, runs "
              f"{' '.join(f'{s * 1e3:.2f}' for s in chain)}")


if __name__ == "__main__":
    main()
