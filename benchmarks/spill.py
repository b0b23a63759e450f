"""Spilling: throughput against ``dd`` to the same directory, and a pipeline bigger than
the workers' memory, d3arrow against dask.distributed with the same limits.

    python -m benchmarks.spill [--dir DIR] [--nbytes 256M] [--systems d3arrow,dask]

Spill write: ``SpillDirectory.write`` of a float64 array (Arrow IPC from the array's own
memory); read back: mapping the file and copying every byte into a buffer that is already
faulted in, as ``dd`` reads into its own. ``dd``: ``if=/dev/zero of=FILE bs=4M`` and
``if=FILE of=/dev/null bs=4M``, the same size, into and out of the page cache (neither
syncs: a spill is not meant to survive the worker). Medians of ``--repeat`` runs.

Pipeline: 2 workers x 1 core, ``memory_limit`` 1 GiB each; make 48 arrays of 128 MiB
(6 GiB, 3x the sum of the limits), then add them all in a pairwise tree and sum the last;
each system spills to ``--dir``. Peak RSS of each worker process is sampled throughout.
docs/benchmarks.md quotes the output.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

from .sampling import PeakMemory

MiB = 2**20
ARRAYS, ARRAY_BYTES, LIMIT = 48, 128 * MiB, 2**30


def _seconds(call, repeat):
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def spill_figures(directory, nbytes, repeat):
    """GB/s of spill write and read-back, and of ``dd`` write and read, same directory."""
    from d3arrow.spill import SpillDirectory

    spills = SpillDirectory(directory)
    array = np.random.default_rng(0).random(nbytes // 8)
    destination = np.ones_like(array)
    path = os.path.join(directory, "d3arrow-dd-test")
    count = nbytes // (4 * MiB)

    def dd(*args):
        subprocess.run(["dd", *args, "bs=4M", f"count={count}", "status=none"], check=True)

    # each write goes to a new file, dropped after it is timed: the same bytes reach the
    # page cache per run, and dirty pages do not pile up from one run to the next
    write_s, dd_write_s = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        spilled = spills.write(array)
        write_s.append(time.perf_counter() - start)
        spilled.close()
        start = time.perf_counter()
        dd("if=/dev/zero", f"of={path}")
        dd_write_s.append(time.perf_counter() - start)
        os.unlink(path)
    write_s, dd_write_s = statistics.median(write_s), statistics.median(dd_write_s)
    spilled = spills.write(array)
    dd("if=/dev/zero", f"of={path}")
    try:
        read_s = _seconds(lambda: np.copyto(destination, spilled.load()), repeat)
        dd_read_s = _seconds(lambda: dd(f"if={path}", "of=/dev/null"), repeat)
    finally:
        spilled.close()
        os.unlink(path)
    assert np.array_equal(destination, array)
    gb = nbytes / 1e9
    return {"spill_write_gbps": gb / write_s, "spill_read_gbps": gb / read_s,
            "dd_write_gbps": gb / dd_write_s, "dd_read_gbps": gb / dd_read_s}


def make_array(i):
    return np.full(ARRAY_BYTES // 8, float(i))


def tree_sum(submit, values):
    """Add ``values`` pairwise until one is left (``submit(np.add, a, b)``)."""
    while len(values) > 1:
        paired = [submit(np.add, a, b) for a, b in zip(values[::2], values[1::2])]
        values = paired + values[len(values) // 2 * 2:]
    return values[0]


EXPECTED = float(sum(range(ARRAYS))) * (ARRAY_BYTES // 8)


def pipeline_d3arrow(directory):
    from d3arrow import LocalCluster, Pool

    with LocalCluster(n_workers=2, ncores=1, memory_limit=LIMIT,
                      local_directory=directory) as cluster, \
            Pool(cluster.center_address) as pool:
        pids = [p.pid for p in cluster.worker_processes]
        with PeakMemory(pids) as rss:
            start = time.perf_counter()
            arrays = pool.map(make_array, range(ARRAYS))
            total = pool.apply(np.sum, [tree_sum(pool.submit, arrays)]).get()
            seconds = time.perf_counter() - start
        restarted = any(not psutil.pid_exists(pid) for pid in pids)
        spilled = sum(i["spilled_bytes"] for i in pool.memory_info().values())
    assert total == EXPECTED, (total, EXPECTED)
    return {"seconds": seconds, "peak_rss": sorted(rss.peaks.values()),
            "peak_private": sorted(rss.private.values()), "restarted": restarted,
            "spilled_bytes": spilled}


def pipeline_dask(directory):
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"temporary-directory": directory}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         memory_limit=LIMIT, dashboard_address=None,
                         local_directory=directory) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        workers_before = set(client.scheduler_info()["workers"])
        with PeakMemory(pids) as rss:
            start = time.perf_counter()
            arrays = client.map(make_array, range(ARRAYS))
            total = client.submit(np.sum, tree_sum(client.submit, arrays)).result()
            seconds = time.perf_counter() - start
        restarted = set(client.scheduler_info()["workers"]) != workers_before or any(
            not psutil.pid_exists(pid) for pid in pids)
    assert total == EXPECTED, (total, EXPECTED)
    return {"seconds": seconds, "peak_rss": sorted(rss.peaks.values()),
            "peak_private": sorted(rss.private.values()), "restarted": restarted}


PIPELINES = {"d3arrow": pipeline_d3arrow, "dask": pipeline_dask}


def pipeline(system, directory=None, repeat=3):
    """The pipeline on ``system`` ``repeat`` times, each on a new cluster spilling to a
    scratch directory under ``directory`` (default: the system's temporary directory):
    the median run's figures, with every run's seconds in ``runs``. Writeback of the page
    cache swings these figures here, so each run starts from a clean one (``sync``)."""
    found = []
    for _ in range(repeat):
        os.sync()  # what earlier writes left dirty is not this run's to pay for
        scratch = tempfile.mkdtemp(prefix=f"spill-{system}-", dir=directory)
        try:
            found.append(PIPELINES[system](scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    os.sync()  # nor is the next measurement to pay for this one's writeback
    found.sort(key=lambda f: f["seconds"])
    median = dict(found[len(found) // 2])
    median["runs"] = [f["seconds"] for f in found]
    median["restarted"] = any(f["restarted"] for f in found)
    return median


def figures(directory, nbytes=256 * MiB, repeat=5, systems=("d3arrow", "dask"),
            report=print):
    """Every figure of this module: ``{name: value}``."""
    out = spill_figures(directory, nbytes, repeat)
    write, read = out["spill_write_gbps"], out["spill_read_gbps"]
    dd_write, dd_read = out["dd_write_gbps"], out["dd_read_gbps"]
    report(f"spill {nbytes // MiB} MiB to {directory}: write {write:.2f} GB/s (dd "
           f"{dd_write:.2f}, {write / dd_write:.2f}x), read back {read:.2f} GB/s (dd "
           f"{dd_read:.2f}, {read / dd_read:.2f}x)")
    for system in systems:
        found = pipeline(system, directory)
        out[f"pipeline_{system}_s"] = found["seconds"]
        out[f"pipeline_{system}_rss"] = found["peak_rss"]
        out[f"pipeline_{system}_private"] = found["peak_private"]
        out[f"pipeline_{system}_restarted"] = found["restarted"]
        report(f"pipeline {ARRAYS} x {ARRAY_BYTES // MiB} MiB, 2 workers x {LIMIT // MiB} MiB "
               f"limit, {system}: median {found['seconds']:.1f} s (runs "
               f"{' '.join(f'{r:.1f}' for r in found['runs'])}), peak RSS per worker "
               f"{', '.join(f'{r / MiB:.0f} MiB' for r in found['peak_rss'])} (private "
               f"{', '.join(f'{r / MiB:.0f} MiB' for r in found['peak_private'])}), "
               f"restarted: {found['restarted']}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--nbytes", type=int, default=256 * MiB)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--systems", default="d3arrow,dask")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if "dask" in systems and importlib_missing("distributed"):
        print("dask: skipped (distributed is not installed: pip install -e '.[compare]')")
        systems.remove("dask")
    found = figures(args.dir, args.nbytes, args.repeat, systems,
                    report=lambda t: print(t, flush=True))
    if "pipeline_dask_s" in found:
        print(f"pipeline: dask.distributed / d3arrow "
              f"{found['pipeline_dask_s'] / found['pipeline_d3arrow_s']:.2f}x")


def importlib_missing(module):
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
