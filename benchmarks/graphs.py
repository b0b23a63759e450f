"""dask graphs and task chains on d3arrow, beside dask's threaded scheduler in the same run.

    python -m benchmarks.graphs [--repeat 3] [--systems d3arrow,threaded,...]

Each run builds its graph afresh (new keys, so no scheduler answers from a previous run);
values do not depend on the process, so every result is compared with the threaded
scheduler's. d3arrow: a LocalCluster of 2 workers x 1 core; dask threaded: 2 threads;
dask.distributed: a LocalCluster of 2 worker processes x 1 thread; Ray: dask-on-Ray with
2 CPUs (the last two where installed, ``pip install -e '.[compare]'``). Systems run one
after the other. Medians of ``--repeat`` runs; every run is printed, the first (cold)
one included, and the peak resident memory of the cluster's processes (summed) during
each work's runs. docs/benchmarks.md quotes the output.
"""

import argparse
import contextlib
import importlib.util
import operator
import statistics
import time

import dask
import dask.array as da
import numpy as np

from d3arrow import Pool

from .sampling import PeakMemory


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


def submit_chain(pool, func, n=1000):
    """Seconds a task of a chain of ``n`` ``func(previous, 1)``, the last value fetched."""
    start = time.perf_counter()
    value = pool.submit(func, 0, 1)
    for _ in range(n - 1):
        value = pool.submit(func, value, 1)
    assert value.result() == n
    return (time.perf_counter() - start) / n


# what a user's script holds: a function sent by value at every call, as one defined in
# __main__ (a lambda is pickled the same way); and one the workers import by name
CHAIN_FUNCTIONS = {"submit_chain_ms": ("a function of the script", lambda x, one: x + one),
                   "submit_chain_importable_ms": ("operator.add, sent by name", operator.add)}


@contextlib.contextmanager
def d3arrow_scheduler():
    with Pool(n_workers=2, ncores=1) as pool:
        yield pool.get, pool


@contextlib.contextmanager
def threaded_scheduler():
    with dask.config.set(num_workers=2):
        yield "threads", None


@contextlib.contextmanager
def distributed_scheduler():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client.get, None


@contextlib.contextmanager
def ray_scheduler():
    import ray
    from ray.util.dask import ray_dask_get

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield ray_dask_get, None
    finally:
        ray.shutdown()


SYSTEMS = {"d3arrow": (d3arrow_scheduler, None), "threaded": (threaded_scheduler, None),
           "dask.distributed": (distributed_scheduler, "distributed"),
           "Ray": (ray_scheduler, "ray")}
WORK = {"P1": p1, "P2": p2, "P3": p3}


def timed(build, scheduler):
    collection = build()  # fresh keys each run
    start = time.perf_counter()
    result = dask.compute(collection, scheduler=scheduler)[0]
    return time.perf_counter() - start, result


def figures(system, repeat=3, expected=None, report=print):
    """Medians (s) and peak RSS (bytes) of P1-P3 on ``system``, and for d3arrow the submit
    chain (s a task): ``{"graph_P1_s": ..., "graph_P1_rss": ..., ...}``."""
    expected = expected or {name: dask.compute(build(), scheduler="threads")[0]
                            for name, build in WORK.items()}
    make, _ = SYSTEMS[system]
    out = {}
    with make() as (scheduler, pool):
        for name, build in WORK.items():
            runs = []
            with PeakMemory(interval=0.05) as memory:
                for _ in range(repeat):
                    seconds, result = timed(build, scheduler)
                    np.testing.assert_allclose(result, expected[name])
                    runs.append(seconds)
            out[f"graph_{name}_s"] = statistics.median(runs)
            out[f"graph_{name}_rss"] = memory.total
            report(f"{name} {system:17s} median {out[f'graph_{name}_s']:6.2f} s  runs "
                   f"{' '.join(f'{s:.2f}' for s in runs)}  cluster peak RSS "
                   f"{memory.total / 2**30:.2f} GiB")
        if pool is not None:
            for key, (label, func) in CHAIN_FUNCTIONS.items():
                chain = [submit_chain(pool, func) for _ in range(repeat)]
                out[key] = statistics.median(chain) * 1e3
                report(f"pool.submit chain of 1,000 dependent tiny tasks, {label}: median "
                       f"{out[key]:.2f} ms per task, runs "
                       f"{' '.join(f'{s * 1e3:.2f}' for s in chain)}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, of " + ", ".join(SYSTEMS))
    args = parser.parse_args(argv)
    expected = {name: dask.compute(build(), scheduler="threads")[0] for name, build in
                WORK.items()}
    medians = {}
    for system in args.systems.split(","):
        module = SYSTEMS[system][1]
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"{system}: skipped ({module} is not installed: pip install -e "
                  f"'.[compare]')")
            continue
        found = figures(system, args.repeat, expected, report=lambda t: print(t, flush=True))
        for name in WORK:
            medians[system, name] = found[f"graph_{name}_s"]
    for name in WORK:
        ours = medians.get(("d3arrow", name))
        others = {s: m for (s, n), m in medians.items() if n == name and s != "d3arrow"}
        if ours:
            print(f"{name}: " + ", ".join(f"{s} / d3arrow {m / ours:.2f}"
                                          for s, m in others.items()))


if __name__ == "__main__":
    main()
