"""The same work on dask.distributed, Ray and multiprocessing.Pool, when they are installed.

Each ``run_*`` returns ``{name: value}`` with the names ``benchmarks.measure.run`` uses, for
what that system can do. Everything stays on 127.0.0.1; Ray's usage reporting is off.
"""

import os
import statistics
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _inc(x):
    return x + 1


def _median_seconds(call, repeat):
    seconds = []
    for i in range(repeat):
        start = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_dask(sizes, big, tiny, repeat, tiny_repeat=1):
    from distributed import Client, LocalCluster

    figures = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        source, target = list(client.scheduler_info()["workers"])
        for nbytes in sizes:
            def task_on_target(i):
                x = client.submit(lambda n, s: np.random.default_rng(s).random(n // 8), nbytes,
                                  i, workers=[source], pure=False)
                x.result()  # the input exists on the source before the clock starts
                start = time.perf_counter()
                client.submit(len, x, workers=[target], pure=False).result()
                return time.perf_counter() - start

            seconds = statistics.median(task_on_target(i) for i in range(repeat))
            figures[f"task_input_tcp_{nbytes}"] = nbytes / seconds / 1e9
        array = np.random.default_rng(1).random(big // 8)
        seconds = _median_seconds(lambda i: client.scatter(array, workers=[source], hash=False),
                                  repeat)
        figures[f"scatter_{big}"] = big / seconds / 1e9
        remote = client.scatter(array, workers=[source], hash=False)
        seconds = _median_seconds(lambda i: remote.result(), repeat)
        figures[f"gather_tcp_{big}"] = big / seconds / 1e9
        client.gather(client.map(_inc, range(1000)))
        seconds = _median_seconds(
            lambda i: client.gather(client.map(_inc, range(tiny), pure=False)), tiny_repeat)
        figures["tiny_tasks_per_s"] = tiny / seconds
        seconds = _median_seconds(lambda i: client.submit(_inc, i, pure=False).result(), 100)
        figures["round_trip_ms"] = seconds * 1e3
    return figures


def run_ray(sizes, big, tiny, repeat, tiny_repeat=1):
    import ray

    figures = {}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        inc = ray.remote(_inc)
        array = np.random.default_rng(1).random(big // 8)
        seconds = _median_seconds(lambda i: ray.put(array), repeat)
        figures[f"scatter_{big}"] = big / seconds / 1e9
        ref = ray.put(array)
        seconds = _median_seconds(lambda i: ray.get(ref), repeat)
        figures[f"gather_shm_{big}"] = big / seconds / 1e9
        ray.get([inc.remote(i) for i in range(1000)])
        seconds = _median_seconds(lambda i: ray.get([inc.remote(j) for j in range(tiny)]),
                                  tiny_repeat)
        figures["tiny_tasks_per_s"] = tiny / seconds
        seconds = _median_seconds(lambda i: ray.get(inc.remote(i)), 100)
        figures["round_trip_ms"] = seconds * 1e3
    finally:
        ray.shutdown()
    return figures


def run_multiprocessing(sizes, big, tiny, repeat, tiny_repeat=1):
    import multiprocessing

    figures = {}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_inc, range(100))
        seconds = _median_seconds(lambda i: pool.map(_inc, range(tiny), chunksize=1),
                                  tiny_repeat)
        figures["tiny_tasks_per_s"] = tiny / seconds
        seconds = _median_seconds(lambda i: pool.apply(_inc, (i,)), 100)
        figures["round_trip_ms"] = seconds * 1e3
        array = np.random.default_rng(1).random(big // 8)
        seconds = _median_seconds(lambda i: pool.apply(len, (array,)), repeat)
        figures[f"scatter_{big}"] = big / seconds / 1e9
    return figures


SYSTEMS = {"dask": ("distributed", run_dask), "ray": ("ray", run_ray),
           "multiprocessing": (None, run_multiprocessing)}
