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


def transfer_seconds(pool, source, target, nbytes, repeat):
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


# -- the figures of the comparison (each a median) --------------------------------------------

def dependent_task_seconds(pool, source, target, nbytes, repeat, *, same_input=False):
    """End to end: a task on ``target`` whose ``nbytes`` input lives on ``source``.

    The same measure as for dask: the input is made on the source (untimed), then the
    timed call runs ``len`` on the target, which fetches the input first. With
    ``same_input``, one input serves every repeat (the target's copy is dropped in
    between), as the raw-socket limit sends one buffer again and again.
    """
    kept = make_on(pool, source, nbytes) if same_input else None
    seconds = []
    for i in range(repeat):
        remote = kept if same_input else make_on(pool, source, nbytes, seed=i)
        start = time.perf_counter()
        result = pool.apply(len, [remote], workers=[target])
        seconds.append(time.perf_counter() - start)
        if same_input:
            forget(pool, target, remote)
            pool.delete([result])
        else:
            pool.delete([remote, result])
    if kept is not None:
        pool.delete([kept])
    return median(seconds)


def scatter_seconds(pool, worker, nbytes, repeat):
    array = np.random.default_rng(1).random(nbytes // 8)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        (remote,) = pool.scatter([array], workers=[worker])
        seconds.append(time.perf_counter() - start)
        pool.delete([remote])
    return median(seconds)


def gather_seconds(pool, worker, nbytes, repeat):
    remote = make_on(pool, worker, nbytes)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = remote.get()
        seconds.append(time.perf_counter() - start)
        del value
    pool.delete([remote])
    return median(seconds)


def tiny_tasks_per_second(pool, n, repeat):
    pool.map(abs, range(1000))  # warm connections and the pace of batches
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        results = pool.map(_inc, range(n))
        seconds.append(time.perf_counter() - start)
        del results
    return n / median(seconds)


def round_trip_seconds(pool, repeat):
    for _ in range(20):
        pool.apply(_inc, [1])
    seconds = []
    for i in range(repeat):
        start = time.perf_counter()
        pool.apply(_inc, [i])
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def peak_rss_growth(local, pool, source, target, nbytes):
    """Receiving worker's peak RSS growth, as a multiple of the payload, for one transfer."""
    pid = local.worker_processes[local.worker_addresses.index(target)].pid
    remote = make_on(pool, source, nbytes)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status(pid)["VmRSS"]
    fetch(pool, target, remote, source)
    growth = _status(pid)["VmHWM"] - before
    forget(pool, target, remote)
    pool.delete([remote])
    return growth / nbytes


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                if line.startswith(("VmRSS", "VmHWM"))}


def _inc(x):
    return x + 1


SOCKET_SENDS = 3  # sends per measurement, both sides: the first of a series runs slowest here


def ratios_to_socket(measure_gbps, nbytes, pairs):
    """``pairs`` ratios of a throughput to the raw socket's, measured just before it.

    The loopback socket's own speed drifts 2x within minutes here, so a limit measured at
    the start of a long run says little about a transfer made minutes later.
    """
    from .limits import socket_throughput

    ratios = []
    for _ in range(pairs):
        socket = socket_throughput(nbytes, SOCKET_SENDS)
        ratios.append(measure_gbps() / socket)
    return ratios


def run(sizes, big, tiny, repeat, pairs):
    """Every d3arrow figure of the comparison: ``{name: value}``."""
    figures = {}
    with cluster(shm=False) as (local, pool):
        source, target = local.worker_addresses
        # first, while the target is fresh: later transfers leave reusable memory behind
        figures[f"peak_rss_{big}"] = peak_rss_growth(local, pool, source, target, big)
        for nbytes in sizes:
            seconds = dependent_task_seconds(pool, source, target, nbytes, repeat)
            figures[f"task_input_tcp_{nbytes}"] = nbytes / seconds / 1e9
        figures[f"scatter_{big}"] = big / scatter_seconds(pool, source, big, repeat) / 1e9
        # the two targets stated against the socket, each paired with a socket measurement
        # made the same way: the median of 3 sends of one buffer over one connection
        for name, gbps in [
                (f"task_input_tcp_{big}", lambda: big / dependent_task_seconds(
                    pool, source, target, big, SOCKET_SENDS, same_input=True) / 1e9),
                (f"scatter_{big}", lambda: big / scatter_seconds(
                    pool, source, big, SOCKET_SENDS) / 1e9)]:
            ratios = ratios_to_socket(gbps, big, pairs)
            figures[f"{name}_per_socket"] = median(ratios)
            figures[f"{name}_per_socket_pairs"] = ratios
        figures[f"gather_tcp_{big}"] = big / gather_seconds(pool, source, big, repeat) / 1e9
        figures["tiny_tasks_per_s"] = tiny_tasks_per_second(pool, tiny, repeat)
        figures["round_trip_ms"] = round_trip_seconds(pool, 200) * 1e3
    with cluster(shm=True) as (local, pool):
        source, target = local.worker_addresses
        for nbytes in sizes:
            seconds = dependent_task_seconds(pool, source, target, nbytes, repeat)
            figures[f"task_input_shm_{nbytes}"] = nbytes / seconds / 1e9
        figures[f"gather_shm_{big}"] = big / gather_seconds(pool, source, big, repeat) / 1e9
    return figures


def serialization_figures(nbytes, repeat):
    """GB/s of turning an array into wire form and back, per method (one process)."""
    import pickle

    import pyarrow as pa

    from d3arrow.serialize import Serialized, deserialize, serialize

    array = np.random.default_rng(3).random(nbytes // 8)

    def timed(call):
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return median(seconds)

    tensor = pa.Tensor.from_numpy(array)
    sink_size = pa.ipc.get_tensor_size(tensor)
    figures = {
        "serialize_d3arrow": nbytes / timed(lambda: serialize(array)) / 1e9,
        "serialize_ipc_write": nbytes / timed(lambda: pa.ipc.write_tensor(
            tensor, pa.FixedSizeBufferWriter(pa.allocate_buffer(sink_size)))) / 1e9,
        "serialize_pickle5_inband": nbytes / timed(lambda: pickle.dumps(array, protocol=5)) / 1e9,
        "serialize_pickle5_oob": nbytes / timed(lambda: pickle.dumps(
            array, protocol=5, buffer_callback=lambda b: None)) / 1e9,
    }
    wire = _concat(serialize(array).payloads[0])
    inband = pickle.dumps(array, protocol=5)
    figures["deserialize_d3arrow"] = nbytes / timed(
        lambda: deserialize(Serialized({"kind": "tensor"}, [wire]))) / 1e9
    figures["deserialize_pickle5_inband"] = nbytes / timed(lambda: pickle.loads(inband)) / 1e9
    return figures


def _concat(pieces):
    import pyarrow as pa

    out = np.empty(sum(memoryview(p).nbytes for p in pieces), dtype=np.uint8)
    pos = 0
    for piece in pieces:
        view = np.frombuffer(piece, dtype=np.uint8)
        out[pos:pos + view.size] = view
        pos += view.size
    return pa.py_buffer(out)
